"""Benchmarks (``dht bench``), never part of the test suite.

* :mod:`dht.bench.command`: the CLI, the table and the JSON report;
* :mod:`dht.bench.workloads`: each workload against this project and Redis, interleaved;
* :mod:`dht.bench.growth`: lookup cost and memory per record from 10k to 5M records;
* :mod:`dht.bench.procs`: a real redis-server on loopback, process RSS;
* :mod:`dht.bench.keys`: synthetic flow keys (also used by the tests).

Redis and matplotlib are imported only when a benchmark runs (the ``bench`` extra).
"""

from dht.bench.command import add_bench_parser, run_bench
from dht.bench.keys import synthetic_keys

__all__ = ["add_bench_parser", "run_bench", "synthetic_keys"]
