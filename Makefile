# One command per chore. `make help` lists them.
PY ?= python3
PROTO_SRC := protos/dht/v1/dht.proto
PROTO_OUT := dht/_proto

.PHONY: help proto proto-check lint typecheck test test-unit test-sim test-integration test-system fuzz bench cluster compose-check demo

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

proto: ## regenerate the protobuf/gRPC code under dht/_proto from protos/
	$(PY) -m grpc_tools.protoc -I$(PROTO_OUT)=protos --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTO_SRC)

proto-check: ## fail if dht/_proto is not what protos/ generates
	$(PY) scripts/check_proto.py

lint: ## ruff lint + format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

typecheck: ## mypy --strict on dht/
	$(PY) -m mypy dht

test: ## the whole suite, as CI runs it
	bash scripts/test.sh

test-unit: ## unit tests only (no sockets)
	$(PY) -m pytest tests/unit

test-sim: ## scripted scenarios of whole PoPs on the in-memory network, in virtual time (no sockets)
	$(PY) -m pytest tests/sim

test-integration: ## real nodes over gRPC on loopback, in-process
	$(PY) -m pytest tests/integration

test-system: ## real processes and faults, one at a time
	$(PY) -m pytest -p no:xdist tests/system

fuzz: ## 100,000 fuzzed gRPC calls against a local node; counts crashes, INTERNAL, dead loops (FUZZ_ARGS=--seed N)
	$(PY) scripts/fuzz.py --cases 100000 $(FUZZ_ARGS)

bench: ## dht vs Redis side by side + growth plot (never part of the test suite; BENCH_ARGS=--quick for < 5 min)
	$(PY) -m dht bench --json bench-results.json --plot docs/bench-growth.png $(BENCH_ARGS)

cluster: ## a local 1-PoP cluster of 3 nodes
	$(PY) -m dht cluster --pops 1 --nodes-per-pop 3

compose-check: ## validate docker-compose.yml offline (compose spec schema, docker-compose v1 if present)
	PYTHON=$(PY) bash scripts/validate_compose.sh

demo: ## the quick start's main job
	$(PY) -m dht demo
