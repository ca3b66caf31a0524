"""``dht simulate``'s parts (docs/simulator.md): ``settings`` (what a run asks for, in
simulated time), ``judge`` (where each packet should have been served, pure), ``run``
(the forwarders, the traffic's schedule, keep-alive), ``report`` (the numbers, the text,
the plot). The command itself is ``dht.tools.simulate``."""
