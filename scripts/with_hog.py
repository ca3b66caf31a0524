"""Run a command while a CPU hog keeps every core busy: one ``while True: pass`` process
per core, at the command's own priority, started before it and killed (by PID) after it,
whatever happens. Exits with the command's status.

    python scripts/with_hog.py python -m pytest -q tests/system/test_membership.py

The races the membership and fault system tests hunt for show on a busy machine
(docs/architecture.md#tests-and-chores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    n = os.cpu_count() or 2
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]
    print(f"with_hog: {n} busy processes (pids {', '.join(str(h.pid) for h in hogs)})", flush=True)
    child = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # The system tests give progress more time beside the hog (PROGRESS_SLACK).
        child = subprocess.Popen(argv, env={**os.environ, "DHT_TEST_HOG": "1"})
        return child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
