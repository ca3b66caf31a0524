"""Fail if dht/_proto is not exactly what protos/ generates (run by the test suite)."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["dht_pb2.py", "dht_pb2.pyi", "dht_pb2_grpc.py", "dht_pb2_grpc.pyi"]


def generate(out: Path) -> None:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Idht/_proto=protos",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            "protos/dht/v1/dht.proto",
        ],
        cwd=ROOT,
        check=True,
        env=env,
        capture_output=True,
    )


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "dht/_proto/dht/v1"
        stale = [
            n
            for n in GENERATED
            if not filecmp.cmp(fresh / n, ROOT / "dht/_proto/dht/v1" / n, shallow=False)
        ]
        if stale:
            print(f"generated code is stale: {stale}; run `make proto`", file=sys.stderr)
            return 1
    print("dht/_proto is current")
    return 0


if __name__ == "__main__":
    if "--write" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            for n in GENERATED:
                shutil.copy(Path(tmp) / "dht/_proto/dht/v1" / n, ROOT / "dht/_proto/dht/v1" / n)
        sys.exit(0)
    sys.exit(main())
