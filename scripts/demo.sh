#!/usr/bin/env bash
# Quick start, main job: start a local 3-PoP cluster of real node processes, drive 40 s
# of synthetic anycast traffic with route flaps through one forwarder per PoP, and print
# how many connections break with the table and under plain anycast
# (`dht simulate --help` for options; extra arguments are passed on, e.g.
# `--json sim.json --plot sim.png`). `dht demo` still shows the single-PoP record calls.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
exec dht simulate --pops 3 --duration 40 "$@"
