#!/usr/bin/env bash
# Quick start, main job: start a local cluster of real node processes and do real work
# with it (`dht demo --help` for options; extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
exec dht demo "$@"
