#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this). Layers, in order:
# generated code current, lint, types, compose file valid, unit + in-memory network
# scenarios (virtual time) + integration tests, then system tests (real processes and
# faults), one at a time, and the fault, membership and PoP system tests once more with
# mutual TLS on every plane (DHT_TEST_TLS=1, tests/system/conftest.py), the fault and PoP
# ones while a CPU hog keeps every core busy (scripts/with_hog.py): the races they hunt
# show on a busy machine. (The membership tests beside a hog do not yet hold their
# progress bounds: docs/architecture.md#tests-and-chores.)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
set -x
python scripts/check_proto.py
python -m ruff check .
python -m ruff format --check .
python -m mypy
bash scripts/validate_compose.sh
python -m pytest -q tests/unit tests/sim tests/integration
python -m pytest -q -p no:randomly tests/system
DHT_TEST_TLS=1 python -m pytest -q -p no:randomly tests/system/test_membership.py
DHT_TEST_TLS=1 python scripts/with_hog.py python -m pytest -q -p no:randomly --timeout 360 \
  tests/system/test_faults.py tests/system/test_pops.py
