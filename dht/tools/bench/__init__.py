"""Benchmarks (``dht bench``), never part of the test suite.

* :mod:`dht.tools.bench.command`: the CLI, the table and the JSON report;
* :mod:`dht.tools.bench.workloads`: each workload against this project and Redis, interleaved;
* :mod:`dht.tools.bench.syn`: the connection path (SYN, second chance, plain miss), one key
  at a time, vs Redis SET NX and GET;
* :mod:`dht.tools.bench.lifecycle`: whole connections (claim, confirm, a miss at another
  PoP, release) at stepped rates, 3 PoPs, vs a Redis per PoP;
* :mod:`dht.tools.bench.tls`: the cost of mutual TLS vs plaintext, interleaved (``--only tls``);
* :mod:`dht.tools.bench.growth`: lookup cost and memory per record from 10k to 5M records;
* :mod:`dht.tools.bench.procs`: a real redis-server on loopback, process RSS and CPU time;
* :mod:`dht.tools.bench.keys`: synthetic flow keys (also used by the tests).

Redis and matplotlib are imported only when a benchmark runs (the ``bench`` extra).
"""

from dht.tools.bench.command import add_bench_parser, run_bench
from dht.tools.bench.keys import synthetic_keys

__all__ = ["add_bench_parser", "run_bench", "synthetic_keys"]
