"""An in-memory network for deterministic scenario tests of whole PoPs, without sockets.

In the style of etcd raft's network tests and memberlist's MockTransport: nodes are the
real :class:`dht.node.node.Node` with the real :class:`dht.pops.extension.Pops`; only
the transports are replaced. :class:`MemPeerTransport` (node to node) and
:class:`MemPopTransport` (PoP to PoP) call the receiving node's methods exactly as the
gRPC servicers do (``NodeInternalService`` and ``FlowTableService`` in
dht/edge/server.py, ``PopLinkService`` in dht/edge/pop_grpc.py), with copies of the
bytes, so nothing is shared by reference.

Time is virtual: the test's event loop is a ``looptime`` loop (tests/sim/conftest.py),
whose clock jumps to the next timer whenever every task waits, so a 5 s failure timeout
passes at once. Each node's monotonic and wall clocks are read from that loop clock
(wall = :data:`EPOCH_MS` + virtual ms + a per-node offset). Every random source is
seeded (the network's ``random.Random`` draws losses; the module ``random`` the nodes'
jitter), and timers are kept on a whole-microsecond grid (so that two timers due at the
same instant tie however the loop's clock was read when they were set): one seed gives
one order of events. :attr:`Network.trace` records every message (sent, answered, from,
to, kind, outcome); two runs of a scenario compare equal.

Faults, per directed link or per node:

* ``set_delay(a, b, ms)``: one-way latency of each leg (request, answer) of a call;
* ``set_loss(a, b, p)``: each leg is lost with probability ``p`` (the caller times out);
* ``cut(a, b)`` / ``heal()``: a partition, symmetric or one-way (the caller times out,
  as over a black-holed link; one way, calls the other way are run but their answers
  are lost); ``isolate(group)`` cuts a group off from everyone else;
* ``pause(n)`` / ``resume(n)``: SIGSTOP and SIGCONT. A paused node sends nothing (its
  calls are held until it resumes; their deadlines start then) and handles nothing
  (calls to it wait for it; a caller gives up after its timeout, and a call whose
  caller gave up is never handled, as gRPC drops a call past its deadline). Its clocks
  stand still while paused and jump on resume, so it detects the pause as a real
  process does; ``pause_when(...)`` pauses a node at the moment it sends a message;
* ``stop(n)``: a graceful stop, or a crash with ``leave=False``; calls to a stopped or
  unknown node are refused at once (``PeerUnreachable(refused=True)``).

A scenario is a script (tests/sim/test_*.py)::

    async with Network(seed=1) as net:
        x, y, z = await net.start_pop(3)          # started, in sync, peers up
        net.cut(x.node_id, z.node_id)
        res = await net.call(x.node_id, BatchCall(Op.CLAIM, keys, pop=1))
        assert res["status"][0] == Status.UNAVAILABLE
        print(net.format_trace(["Replicate", "Undo"]))

Node construction and wiring (what dht.edge.server.NodeServer does) live in one place,
:meth:`Network.add_node`, and its stop in :meth:`Network.stop`; ``add_node`` with a
stopped node's config restarts it (a new process, empty stores).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from dht.core.config import NodeConfig, build_config
from dht.core.errors import DhtError
from dht.core.membership import MemberState
from dht.core.ops import BatchCall, Op
from dht.core.placement import Member
from dht.core.wire import ENTRY_SIZE, KEY_DTYPE, RESULT_DTYPE, ResultArray, key_hashes
from dht.edge import convert
from dht.edge.pop_grpc import partitions_field
from dht.edge.status import grpc_status
from dht.node.node import Node
from dht.node.replication import MergeResult, PeerUnreachable
from dht.pops.extension import Digests, Pops, PopUnreachable, ShipResult
from dht.tools.cluster import plan

T = TypeVar("T")

# Wall-clock time zero of every network (Unix ms, as in tests/integration FakeTime).
EPOCH_MS = 1_800_000_000_000
POPS = {"ams": 1, "fra": 2, "lon": 3}
CLIENT = "client"  # the sender of calls a test makes (Network.call)


@dataclass(frozen=True, slots=True)
class Event:
    """One message (a call and its answer) as the trace records it."""

    sent_ms: int  # virtual ms when the request left (or was refused)
    done_ms: int  # when the caller had its outcome
    src: str
    dst: str
    kind: str  # the gRPC method ("Replicate" = a coordinated write; ":hinted"/":copies")
    # ok (ok:fenced, ok:stale, ok:superseded for a write; ok:kept N for an undo), refused,
    # error:<STATUS>, timeout:<why>, cancelled; a stream's adds its batches.
    outcome: str

    def __str__(self) -> str:
        return (
            f"{self.sent_ms:>7} {self.done_ms:>7}  {self.src:>7} -> {self.dst:<7} "
            f"{self.kind:<20} {self.outcome}"
        )


@dataclass(frozen=True, slots=True)
class Msg:
    """A message about to be sent (what ``pause_when`` rules look at)."""

    src: str
    dst: str
    kind: str


@dataclass
class _Rule:
    match: Callable[[Msg], bool]
    fired: asyncio.Future[Msg]


class _Failed(Exception):
    """A call failed on the wire (turned into the transport's own error)."""

    def __init__(self, outcome: str, detail: str, refused: bool = False) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.refused = refused


@dataclass
class SimNode:
    """One node of the network and its simulated process state."""

    config: NodeConfig
    node: Node
    pops: Pops
    address: str
    serving: bool = True
    paused_at: int | None = None  # virtual ms when paused (its clocks stand still)
    offset_ms: int = 0  # its wall clock's offset
    running: asyncio.Event = field(default_factory=asyncio.Event)
    paused: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def __repr__(self) -> str:
        return f"SimNode({self.node_id})"


def held_by(sim: SimNode, raw: bytes) -> ResultArray:
    """The copy ``sim``'s store holds of the flow ``raw`` (one 40-byte key)."""
    return sim.node.store.copies(np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw))


class _Reason:
    """Why a call has not been answered yet (shown in the trace when it times out)."""

    def __init__(self) -> None:
        self.why = "no answer"


class Network:
    """Nodes by address, links between them, a virtual clock and the trace. Use as
    ``async with Network(seed) as net:`` inside a looptime test."""

    def __init__(self, seed: int = 0, delay_ms: int = 1) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        random.seed(seed)  # the nodes' jitter (Node.every) uses the module's generator
        self.delay_ms = delay_ms
        self.nodes: dict[str, SimNode] = {}  # by address
        self.by_id: dict[str, SimNode] = {}
        self.trace: list[Event] = []
        self.crashes: list[str] = []  # handlers that raised something other than DhtError
        self._delay: dict[tuple[str, str], int] = {}
        self._loss: dict[tuple[str, str], float] = {}
        self._cut: set[tuple[str, str]] = set()
        self._rules: list[_Rule] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0_us = 0
        self._entered = False

    async def __aenter__(self) -> Network:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._t0_us = _us(loop.time())
        # Timers due at the same instant must compare equal whatever the loop's clock
        # read when they were set (``time() + delay`` in floating point may differ in
        # the last bit): put every timer on the whole-microsecond grid, so a seed gives
        # one order of events on any loop.
        plain_call_at = loop.call_at

        def call_at(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            return plain_call_at(_us(when) / 1_000_000, *args, **kwargs)

        loop.call_at = call_at  # type: ignore[method-assign,assignment]
        self._entered = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            # Shown with the failure (pytest prints a failed test's output).
            print(f"the last messages of seed {self.seed}:\n" + self.format_trace(last=40))
        await self.close(check=exc_type is None)

    async def close(self, check: bool = True) -> None:
        """Heal, resume and stop every node (without leaving); put Pops' clock back."""
        self._cut.clear()
        for sim in self.by_id.values():
            if sim.paused_at is not None:
                self.resume(sim.node_id)
        try:
            for sim in list(self.by_id.values()):
                await self.stop(sim.node_id, leave=False)
        finally:
            if self._loop is not None and "call_at" in vars(self._loop):
                del self._loop.call_at  # the loop's own method again
        if check:
            assert not self.crashes, f"handlers raised: {self.crashes}"

    # ------------------------------------------------------------------ clocks

    def now_ms(self) -> int:
        """Virtual ms since the network was entered (whole ms, counted in integers)."""
        assert self._loop is not None, "use the network inside `async with`"
        return (_us(self._loop.time()) - self._t0_us) // 1000

    def _node_ms(self, sim: SimNode) -> int:
        return self.now_ms() if sim.paused_at is None else sim.paused_at

    def set_clock_offset(self, node_id: str, offset_ms: int) -> None:
        self.by_id[node_id].offset_ms = offset_ms

    # ------------------------------------------------------------------ nodes

    def config(self, node_id: str, pop: str, port: int, **values: Any) -> NodeConfig:
        """A node's config with the test timing profile and a fake host and port."""
        return build_config(
            {
                "profile": "test",
                "node_id": node_id,
                "pop": pop,
                "pops": POPS,
                "host": "sim",
                "insecure": True,  # in memory: no sockets, no TLS
                "grpc_port": port,
                "admin_port": -1,
                "num_partitions": 64,
                **values,
            }
        )

    def add_node(self, config: NodeConfig) -> SimNode:
        """Build a node with in-memory transports and start it: the wiring of
        dht.edge.server.NodeServer (``__init__`` and ``start``), in one place. A stopped
        node's config starts it again, as a new process (empty stores)."""
        assert self._entered, "use the network inside `async with`"
        address = f"{config.advertised}:{config.grpc_port}"
        assert address not in self.nodes or not self.nodes[address].serving, f"{address} runs"
        peers = MemPeerTransport(self, config)
        pop_transport = MemPopTransport(self, config)
        made: list[Pops] = []

        def extension(node: Node) -> Pops:
            made.append(Pops(node, pop_transport))
            return made[0]

        sim: SimNode | None = None

        def mono_ms() -> int:
            return self.now_ms() if sim is None else self._node_ms(sim)

        def wall_ms() -> int:
            return EPOCH_MS + mono_ms() + (0 if sim is None else sim.offset_ms)

        node = Node(
            config,
            peers,
            forward=MemForward(self, config).forward,
            extension=extension,
            wall_ms=wall_ms,
            mono_ms=mono_ms,
        )
        sim = SimNode(config, node, made[0], address)
        sim.running.set()
        self.nodes[address] = sim
        self.by_id[config.node_id] = sim
        # NodeServer.start: membership once the port is known, loops, then accept calls
        # (a node joining through seeds once it has joined and synced).
        node.init_membership(config.grpc_port, -1)
        node.start_loops()
        sim.pops.start()
        node.accepting = node.joined
        return sim

    async def stop(self, node_id: str, leave: bool = True) -> None:
        """NodeServer.stop: leave (hand off), stop serving, stop the loops. Without
        ``leave``, a crash: calls to it are refused from now on."""
        sim = self.by_id[node_id]
        if not sim.serving:
            return
        if leave:
            await sim.node.leave(sim.config.leave_timeout_s)
        sim.node.accepting = False
        sim.serving = False
        await sim.node.stop_loops()
        await sim.pops.close()

    def pop_configs(
        self, pops: dict[str, int], base_port: int = 7000, **values: Any
    ) -> dict[str, list[NodeConfig]]:
        """Configs of whole PoPs ({name: nodes}), each node knowing its PoP's others as
        peers and the other PoPs' nodes as pop_peers."""
        specs = [
            s
            for s in plan(len(POPS), max(pops.values()), host="sim", base_port=base_port)
            if s.pop in pops and int(s.node_id.rsplit("-", 1)[1]) <= pops[s.pop]
        ]
        out: dict[str, list[NodeConfig]] = {}
        for spec in specs:
            others: dict[str, list[str]] = {}
            for s in specs:
                if s.pop != spec.pop:
                    others.setdefault(s.pop, []).append(s.grpc)
            peers = [f"{s.node_id}={s.grpc}" for s in specs if s.pop == spec.pop and s is not spec]
            cfg = self.config(
                spec.node_id,
                spec.pop,
                spec.grpc_port,
                peers=peers,
                pop_peers=others,
                **values,
            )
            out.setdefault(spec.pop, []).append(cfg)
        return out

    async def start_pops(self, pops: dict[str, int], **values: Any) -> dict[str, list[SimNode]]:
        """Start whole PoPs and wait until they have settled (see :meth:`settled`)."""
        configs = self.pop_configs(pops, **values)
        out = {pop: [self.add_node(c) for c in cfgs] for pop, cfgs in configs.items()}
        await self.until(self.settled, what="every node in sync, its peers up")
        return out

    async def start_pop(self, n: int = 3, pop: str = "ams", **values: Any) -> list[SimNode]:
        """Start one PoP of ``n`` nodes (see :meth:`start_pops`)."""
        return (await self.start_pops({pop: n}, **values))[pop]

    def settled(self) -> bool:
        """Every serving node in sync and accepting, every peer it knows up, no hints
        left, its start-up resync with the other PoPs done."""
        for sim in self.by_id.values():
            if not sim.serving:
                continue
            node = sim.node
            if not (node.in_sync and node.accepting and sim.pops.startup.is_set()):
                return False
            if not all(h.up for h in node.view.health.values()):
                return False
            if any(node.repair.hints.count(p) for p in node.view.health):
                return False
        return True

    def replicas(self, raw: bytes, via: str | None = None) -> tuple[int, list[SimNode]]:
        """The partition of the first key of ``raw`` and its replicas, primary first,
        in the table of ``via`` (default: the first node)."""
        node = (self.by_id[via] if via else next(iter(self.by_id.values()))).node
        table = node.table
        part = int(table.partitions_of(key_hashes(raw[:40]))[0])
        return part, [self.by_id[table.members[int(i)].node_id] for i in table.replicas[part]]

    async def until(
        self, cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition"
    ) -> None:
        """Wait, in virtual time, until ``cond()`` holds (polled every 10 ms)."""
        deadline = self.now_ms() + round(timeout_s * 1000)
        while not cond():
            if self.now_ms() >= deadline:
                raise AssertionError(f"{what}: not reached in {timeout_s} s (virtual)")
            await asyncio.sleep(0.01)

    async def wait(self, aw: Awaitable[T], timeout_s: float = 30.0, what: str = "it") -> T:
        """Await ``aw`` for at most ``timeout_s`` (virtual): the nodes' timers never let
        the loop idle, so a wait without a bound would run on forever."""
        try:
            return await asyncio.wait_for(aw, timeout_s)
        except TimeoutError:
            raise AssertionError(f"{what}: not done in {timeout_s} s (virtual)") from None

    async def run_for(self, seconds: float) -> None:
        """Let the network run for ``seconds`` of virtual time."""
        await asyncio.sleep(seconds)

    # ------------------------------------------------------------------ faults

    def _pairs(self, a: str, b: str, both: bool) -> list[tuple[str, str]]:
        return [(a, b), (b, a)] if both else [(a, b)]

    def set_delay(self, a: str, b: str, ms: int, both: bool = True) -> None:
        for link in self._pairs(a, b, both):
            self._delay[link] = ms

    def set_loss(self, a: str, b: str, p: float, both: bool = True) -> None:
        for link in self._pairs(a, b, both):
            self._loss[link] = p

    def cut(self, a: str, b: str, both: bool = True) -> None:
        """No message from ``a`` reaches ``b`` (nor back, unless ``both`` is False). One
        way, ``a``'s calls to ``b`` time out, and ``b``'s calls to ``a`` are run by
        ``a`` but their answers are lost (``b`` times out too)."""
        self._cut.update(self._pairs(a, b, both))

    def isolate(self, group: Iterable[str]) -> None:
        """Cut ``group`` off from every other node (both ways)."""
        inside = set(group)
        for a in inside:
            for b in self.by_id:
                if b not in inside:
                    self.cut(a, b)

    def heal(self) -> None:
        """Every link carries messages again (delays and losses stay)."""
        self._cut.clear()

    def pause(self, node_id: str) -> None:
        """SIGSTOP (see the module docstring): held calls, clocks standing still."""
        sim = self.by_id[node_id]
        if sim.paused_at is None:
            sim.paused_at = self.now_ms()
            sim.running.clear()
            sim.paused.set()

    def resume(self, node_id: str) -> None:
        """SIGCONT: held calls go out, its clocks jump to the present."""
        sim = self.by_id[node_id]
        sim.paused_at = None
        sim.paused.clear()
        sim.running.set()

    def pause_when(
        self,
        src: str,
        kind: str,
        dst: str | None = None,
    ) -> asyncio.Future[Msg]:
        """Pause ``src`` as it is about to send its next ``kind`` message (to ``dst``,
        or anyone). The message is then held, like every other of its messages, until
        it resumes. Returns a future that resolves to the message when this fires."""
        fired: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        def match(m: Msg) -> bool:
            return m.src == src and m.kind == kind and (dst is None or m.dst == dst)

        self._rules.append(_Rule(match, fired))
        return fired

    # ------------------------------------------------------------------ calls

    async def call(self, node_id: str, call: BatchCall, timeout_s: float = 60.0) -> ResultArray:
        """A client's batch call to a node (FlowTableService), as results. A DhtError of
        the node (NotReady, InvalidArgument) is raised as is; no answer within
        ``timeout_s`` (virtual) fails the test, rather than letting it run on."""
        sim = self.by_id[node_id]
        conv = _through_wire(call)
        error: list[DhtError] = []

        async def serve(node: Node) -> bytes:
            try:
                return await node.batch(conv)
            except DhtError as e:
                error.append(e)
                raise

        try:
            raw = await self.rpc(CLIENT, sim.address, call.op.value, timeout_s, serve)
        except _Failed as e:
            if error:
                raise error[0] from None
            raise AssertionError(f"{call.op.value} at {node_id}: {e.detail}") from None
        return np.frombuffer(raw, dtype=RESULT_DTYPE).copy()

    def _record(self, sent: int, src: str, dst: str, kind: str, outcome: str) -> None:
        self.trace.append(Event(sent, self.now_ms(), src, dst, kind, outcome))

    def _before_send(self, msg: Msg) -> None:
        for rule in list(self._rules):
            if rule.match(msg):
                self._rules.remove(rule)
                self.pause(msg.src)
                rule.fired.set_result(msg)

    async def _leg(self, a: str, b: str, reason: _Reason) -> bool:
        """One message across the link a -> b: False if it is lost or cut."""
        if (a, b) in self._cut:
            reason.why = "cut"
            return False
        p = self._loss.get((a, b), 0.0)
        if p and self.rng.random() < p:
            reason.why = "lost"
            return False
        await asyncio.sleep(self._delay.get((a, b), self.delay_ms) / 1000)
        if (a, b) in self._cut:  # cut while in flight
            reason.why = "cut"
            return False
        return True

    async def _hang(self) -> None:
        await asyncio.get_running_loop().create_future()

    async def _arrive(self, src: str, dst: SimNode, reason: _Reason) -> None:
        """The request leg, then the callee takes it (once it runs, if paused)."""
        if not await self._leg(src, dst.node_id, reason):
            await self._hang()
        if not dst.running.is_set():
            reason.why = f"{dst.node_id} paused"
            await dst.running.wait()
        if not dst.serving:
            raise _Failed("refused", "UNAVAILABLE: connection refused", refused=True)

    async def _answer(self, src: str, dst: SimNode, reason: _Reason) -> None:
        """The answer leg (once the callee runs, if it was paused meanwhile)."""
        await dst.running.wait()
        if not await self._leg(dst.node_id, src, reason):
            await self._hang()

    async def _handle(self, dst: SimNode, work: Awaitable[T]) -> T:
        try:
            return await work
        except DhtError as e:
            raise _Failed(f"error:{grpc_status(e).name}", f"{grpc_status(e).name}: {e}") from e
        except (asyncio.CancelledError, _Failed):
            raise
        except Exception as e:
            self.crashes.append(f"{dst.node_id}: {e!r}")
            raise _Failed("error:UNKNOWN", f"UNKNOWN: {e!r}") from e

    async def _within(self, src: str, fut: asyncio.Future[T], timeout_s: float | None) -> T:
        """Wait for ``fut`` up to ``timeout_s`` of the caller's own time: none passes
        while the caller is paused, and an answer waits for it to resume."""
        sim = self.by_id.get(src)
        left_ms = None if timeout_s is None else round(timeout_s * 1000)
        while True:
            if sim is not None and not sim.running.is_set():
                await sim.running.wait()
                continue
            if fut.done():
                return fut.result()
            if left_ms is not None and left_ms <= 0:
                raise TimeoutError
            waiters: set[asyncio.Future[Any]] = {fut}
            paused = None
            if sim is not None:
                paused = asyncio.ensure_future(sim.paused.wait())
                waiters.add(paused)
            started = self.now_ms()
            timeout = None if left_ms is None else left_ms / 1000
            try:
                done, _ = await asyncio.wait(
                    waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                if paused is not None:
                    paused.cancel()
            if not done:
                raise TimeoutError  # the whole time left passed
            if left_ms is not None:
                left_ms -= self.now_ms() - started  # the caller paused meanwhile

    async def _sending(self, src: str, dst: str, kind: str) -> None:
        """Rules first (they may pause the sender), then a paused sender holds it."""
        self._before_send(Msg(src, dst, kind))
        sender = self.by_id.get(src)
        if sender is not None:
            await sender.running.wait()

    async def rpc(
        self,
        src: str,
        address: str,
        kind: str,
        timeout_s: float | None,
        handler: Callable[[Node], Awaitable[T]],
        note: Callable[[T], str] | None = None,
    ) -> T:
        """One unary call from node ``src`` to the node at ``address``: ``handler`` runs
        on the callee's node. Raises _Failed (refused, timed out, an error status).
        ``note`` adds what the answer says to the trace's outcome ("ok:fenced")."""
        dst = self.nodes.get(address)
        dst_id = dst.node_id if dst is not None else address
        await self._sending(src, dst_id, kind)
        sent = self.now_ms()
        if dst is None or not dst.serving:
            self._record(sent, src, dst_id, kind, "refused")
            raise _Failed("refused", "UNAVAILABLE: connection refused", refused=True)
        reason = _Reason()

        async def exchange() -> T:
            assert dst is not None
            await self._arrive(src, dst, reason)
            result = await self._handle(dst, handler(dst.node))
            await self._answer(src, dst, reason)
            return result

        task = asyncio.ensure_future(exchange())
        try:
            result = await self._within(src, task, timeout_s)
        except TimeoutError:
            self._record(sent, src, dst_id, kind, f"timeout:{reason.why}")
            raise _Failed(f"timeout:{reason.why}", f"DEADLINE_EXCEEDED ({reason.why})") from None
        except _Failed as e:
            self._record(sent, src, dst_id, kind, e.outcome)
            raise
        except asyncio.CancelledError:
            self._record(sent, src, dst_id, kind, "cancelled")
            raise
        finally:
            if not task.done():
                task.cancel()
        said = note(result) if note is not None else ""
        self._record(sent, src, dst_id, kind, f"ok:{said}" if said else "ok")
        return result

    async def stream(
        self,
        src: str,
        address: str,
        kind: str,
        batch_timeout_s: float,
        open_stream: Callable[[Node], AsyncIterator[bytes]],
    ) -> AsyncIterator[bytes]:
        """A server-streaming call: ``open_stream`` runs on the callee, each batch crosses
        the link on its own and is bounded by ``batch_timeout_s`` (a stalled stream
        fails). Raises _Failed."""
        dst = self.nodes.get(address)
        dst_id = dst.node_id if dst is not None else address
        await self._sending(src, dst_id, kind)
        sent = self.now_ms()
        if dst is None or not dst.serving:
            self._record(sent, src, dst_id, kind, "refused")
            raise _Failed("refused", "UNAVAILABLE: connection refused", refused=True)
        reason = _Reason()
        queue: asyncio.Queue[bytes | _Failed | None] = asyncio.Queue()

        async def produce() -> None:
            assert dst is not None
            try:
                await self._arrive(src, dst, reason)

                async def each() -> None:
                    async for chunk in open_stream(dst.node):
                        await self._answer(src, dst, reason)
                        queue.put_nowait(bytes(chunk))

                await self._handle(dst, each())
                await self._answer(src, dst, reason)
                queue.put_nowait(None)
            except _Failed as e:
                queue.put_nowait(e)

        task = asyncio.ensure_future(produce())
        batches = 0
        outcome = "ok"
        try:
            while True:
                got = asyncio.ensure_future(queue.get())
                try:
                    item = await self._within(src, got, batch_timeout_s)
                finally:
                    got.cancel()
                if item is None:
                    break
                if isinstance(item, _Failed):
                    outcome = item.outcome
                    raise item
                batches += 1
                yield item
        except TimeoutError:
            outcome = f"timeout:{reason.why}"
            raise _Failed(outcome, f"stalled ({reason.why})") from None
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            if not task.done():
                task.cancel()
            self._record(sent, src, dst_id, kind, f"{outcome} ({batches} batches)")

    # ------------------------------------------------------------------ the trace

    def format_trace(self, kinds: Sequence[str] | None = None, last: int = 0) -> str:
        """The trace as text, one message a line (sent, answered, from, to, kind,
        outcome): of ``kinds`` only, the ``last`` few only."""
        events = [e for e in self.trace if kinds is None or e.kind in kinds]
        return "\n".join(str(e) for e in events[-last:])


def _us(seconds: float) -> int:
    """Loop time as whole microseconds (looptime's own resolution)."""
    return round(seconds * 1_000_000)


def _through_wire(call: BatchCall) -> BatchCall:
    """A batch call as a FlowTable request carries it (dht.edge.convert both ways)."""
    if call.op in (Op.GET_AFFINITY, Op.SET_AFFINITY):
        return convert.affinity_call(call.op, convert.affinity_request(call))
    return convert.flow_call(call.op, convert.flow_request(call))


def _merge_note(res: MergeResult) -> str:
    """What a replica said to a write, beyond taking it."""
    if res.fenced.size:
        return "fenced"
    if res.stale:
        return "stale"
    return "superseded" if res.superseded.size else ""


def _kept_note(kept: bytes) -> str:
    """An undo's answer: how many entries the replica left standing."""
    return f"kept {len(kept) // 4}" if kept else ""


def _pack_parts(parts: npt.NDArray[np.intp]) -> bytes:
    return parts.astype(">u2").tobytes()


class MemForward:
    """One-hop forwarding (dht.edge.server.Peers.forward): the target node's batch
    call, through FlowTableService, bounded by the forward timeout."""

    def __init__(self, net: Network, config: NodeConfig) -> None:
        self.net = net
        self.node_id = config.node_id
        self.timeout_s = config.forward_timeout_ms / 1000

    async def forward(self, member: Member, call: BatchCall) -> bytes:
        conv = _through_wire(call)

        async def serve(node: Node) -> bytes:
            return await node.batch(conv)

        try:
            return await self.net.rpc(
                self.node_id, member.address, call.op.value, self.timeout_s, serve
            )
        except _Failed as e:
            raise PeerUnreachable(member.node_id, e.detail, refused=e.refused) from None


class MemPeerTransport:
    """dht.node.replication.PeerTransport in memory: each call runs what
    NodeInternalService (dht/edge/server.py) runs on the receiving node."""

    def __init__(self, net: Network, config: NodeConfig) -> None:
        self.net = net
        self.node_id = config.node_id
        self.rpc_timeout_s = config.rpc_timeout_ms / 1000
        self.probe_timeout_s = config.probe_timeout_ms / 1000

    async def _rpc(
        self,
        member: Member,
        kind: str,
        timeout_s: float,
        handler: Callable[[Node], Awaitable[T]],
        note: Callable[[T], str] | None = None,
    ) -> T:
        try:
            return await self.net.rpc(self.node_id, member.address, kind, timeout_s, handler, note)
        except _Failed as e:
            raise PeerUnreachable(member.node_id, e.detail, refused=e.refused) from None

    async def ping(
        self, member: Member, view: Sequence[MemberState]
    ) -> tuple[int, list[MemberState]]:
        sent = convert.members_to_pb(list(view))
        from_node = self.node_id

        async def serve(n: Node) -> tuple[int, list[Any]]:
            n.view.heard_from(from_node)
            n.gossip_in(convert.members_from_pb(sent))
            return n.table.epoch, convert.members_to_pb(n.membership.view())

        epoch, members = await self._rpc(member, "Ping", self.probe_timeout_s, serve)
        return epoch, convert.members_from_pb(members)

    async def ping_req(self, via: Member, target: Member) -> bool:
        target_node, target_address = target.node_id, target.address

        async def serve(n: Node) -> bool:
            return await n.liveness.ping_req(target_node, target_address)

        # The helper's own probe is bounded by the probe timeout; allow for it.
        return await self._rpc(via, "PingReq", 2 * self.probe_timeout_s, serve)

    async def replicate(
        self,
        member: Member,
        entries: bytes,
        hinted: bool,
        issued_hlc: int = 0,
        terms: npt.NDArray[np.uint64] | None = None,
    ) -> MergeResult:
        raw, from_node = bytes(entries), self.node_id
        wire_terms = None if terms is None else terms.copy()

        async def serve(n: Node) -> MergeResult:
            return n.internal_replicate(raw, issued_hlc, wire_terms, from_node)

        kind = (
            "Replicate"
            if terms is not None
            else ("Replicate:hinted" if hinted else "Replicate:copies")
        )
        res = await self._rpc(member, kind, self.rpc_timeout_s, serve, _merge_note)
        return MergeResult(
            res.applied,
            res.refused,
            res.stale,
            res.fenced.copy(),
            res.fenced_by,
            res.superseded.copy(),
            res.fenced_by_floor,
        )

    async def promise(
        self, member: Member, partitions: npt.NDArray[np.intp], term: int
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
        raw, from_node = _pack_parts(partitions), self.node_id

        async def serve(n: Node) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
            n.view.heard_from(from_node)
            promised, incomplete = n.internal_promise(n.partitions_arg(raw), term, from_node)
            return promised.copy(), incomplete.copy()

        promised, incomplete = await self._rpc(member, "Promise", self.rpc_timeout_s, serve)
        if len(promised) != len(partitions):
            raise PeerUnreachable(member.node_id, f"answered {len(promised)} promises")
        return promised, incomplete

    async def undo(
        self, member: Member, written: bytes, before: bytes, terms: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.intp]:
        w, b, t, from_node = bytes(written), bytes(before), terms.copy(), self.node_id

        async def serve(n: Node) -> bytes:
            kept = n.internal_undo(w, b, t, from_node)
            assert len(w) // ENTRY_SIZE >= len(kept)  # the servicer's `undone`
            return kept.astype(">u4").tobytes()

        answer = await self._rpc(member, "Undo", self.rpc_timeout_s, serve, _kept_note)
        kept: npt.NDArray[np.intp] = np.frombuffer(answer, dtype=">u4").astype(np.intp)
        return kept

    async def read_copies(self, member: Member, keys: bytes) -> tuple[bytes, npt.NDArray[np.bool_]]:
        raw = bytes(keys)

        async def serve(n: Node) -> tuple[bytes, npt.NDArray[np.bool_]]:
            copies, incomplete = n.internal_copies(raw)
            return copies, incomplete.copy()

        return await self._rpc(member, "ReadCopies", self.rpc_timeout_s, serve)

    async def digests(
        self, member: Member, partitions: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32]]:
        raw = _pack_parts(partitions)

        async def serve(n: Node) -> tuple[bytes, bytes]:
            digests, counts = n.internal_digests(n.partitions_arg(raw))
            return digests.astype(">u8").tobytes(), counts.astype(">u4").tobytes()

        d, c = await self._rpc(member, "PartitionDigests", self.rpc_timeout_s, serve)
        return (
            np.frombuffer(d, dtype=">u8").astype(np.uint64),
            np.frombuffer(c, dtype=">u4").astype(np.uint32),
        )

    async def fetch(
        self, member: Member, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> AsyncIterator[bytes]:
        raw = _pack_parts(partitions)

        def serve(n: Node) -> AsyncIterator[bytes]:
            return n.internal_fetch(n.partitions_arg(raw), settled_only)

        # A whole-node refill may stream for a while: bound each batch, not the stream.
        batches = self.net.stream(
            self.node_id, member.address, "FetchPartitions", self.rpc_timeout_s * 5, serve
        )
        try:
            async for chunk in batches:
                yield chunk
        except _Failed as e:
            raise PeerUnreachable(member.node_id, e.detail, refused=e.refused) from None

    def reset(self, member: Member) -> None:
        """Nothing to reconnect in memory."""


class _MemStream:
    """One Ship stream to a node of another PoP: a batch at a time, each acknowledged."""

    def __init__(self, t: MemPopTransport, address: str) -> None:
        self._t = t
        self._address = address

    async def send(self, seq: int, raw: bytes, sent_hlc: int) -> ShipResult:
        t = self._t
        batch = bytes(raw)

        async def serve(n: Node) -> tuple[int, ShipResult]:
            return seq, await t.receive(n, batch, sent_hlc)

        try:
            acked, res = await t.net.rpc(t.node_id, self._address, "Ship", t.timeout_s, serve)
        except _Failed as e:
            raise PopUnreachable(f"{self._address}: {e.detail}") from None
        if acked != seq:
            raise PopUnreachable(f"{self._address}: acknowledged {acked}, sent {seq}")
        return res

    async def close(self) -> None:
        """Nothing to cancel in memory."""


class MemPopTransport:
    """dht.pops.extension.PopTransport in memory: each call runs what PopLinkService
    (dht/edge/pop_grpc.py) runs on the receiving node's Pops."""

    def __init__(self, net: Network, config: NodeConfig) -> None:
        self.net = net
        self.from_pop = config.pop_id
        self.node_id = config.node_id
        self.num_partitions = config.num_partitions
        self.timeout_s = config.rpc_timeout_ms / 1000

    def _pops(self, n: Node) -> Pops:
        pops = n.extension
        assert isinstance(pops, Pops)
        return pops

    async def receive(self, n: Node, raw: bytes, sent_hlc: int) -> ShipResult:
        """PopLinkService._receive (the batch's format version is always ours here)."""
        res = await self._pops(n).receive(raw, self.from_pop, sent_hlc, self.num_partitions)
        return ShipResult(res.ok, res.applied, res.rejected, res.error)

    def stream(self, address: str) -> _MemStream:
        return _MemStream(self, address)

    async def digests(
        self, address: str, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> Digests:
        raw, from_pop = _pack_parts(partitions), self.from_pop

        async def serve(n: Node) -> tuple[bytes, bytes, bytes]:
            pops = self._pops(n)
            pops.peer_pop_name(from_pop)
            d = pops.digests_for(partitions_field(raw, num_partitions), num_partitions, cutoff_ms)
            return (
                _pack_parts(d.partitions),
                d.digests.astype(">u8").tobytes(),
                d.counts.astype(">u4").tobytes(),
            )

        try:
            # Digests of a whole node's partitions take a moment to compute: slack.
            p, d, c = await self.net.rpc(
                self.node_id, address, "PopDigests", self.timeout_s * 3, serve
            )
        except _Failed as e:
            raise PopUnreachable(f"{address}: {e.detail}") from None
        return Digests(
            np.frombuffer(p, dtype=">u2").astype(np.intp),
            np.frombuffer(d, dtype=">u8").astype(np.uint64),
            np.frombuffer(c, dtype=">u4").astype(np.uint32),
        )

    async def fetch(
        self, address: str, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> AsyncIterator[bytes]:
        raw, from_pop = _pack_parts(partitions), self.from_pop

        def serve(n: Node) -> AsyncIterator[bytes]:
            pops = self._pops(n)
            pops.peer_pop_name(from_pop)
            return pops.fetch_for(partitions_field(raw, num_partitions), num_partitions, cutoff_ms)

        # A bulk resync may stream for a while: bound each batch, not the stream.
        batches = self.net.stream(self.node_id, address, "PopFetch", self.timeout_s * 5, serve)
        try:
            async for chunk in batches:
                yield chunk
        except _Failed as e:
            raise PopUnreachable(f"{address}: {e.detail}") from None

    async def lookup(self, address: str, raw: bytes) -> bytes:
        keys, from_pop = bytes(raw), self.from_pop

        async def serve(n: Node) -> bytes:
            return await self._pops(n).lookup_for(keys, from_pop)

        try:
            return await self.net.rpc(self.node_id, address, "PopLookup", self.timeout_s, serve)
        except _Failed as e:
            raise PopUnreachable(f"{address}: {e.detail}") from None

    async def push(self, address: str, raw: bytes, sent_hlc: int) -> ShipResult:
        batch = bytes(raw)

        async def serve(n: Node) -> ShipResult:
            return await self.receive(n, batch, sent_hlc)

        try:
            return await self.net.rpc(self.node_id, address, "PopPush", self.timeout_s * 3, serve)
        except _Failed as e:
            raise PopUnreachable(f"{address}: {e.detail}") from None

    async def close(self) -> None:
        """Nothing to close in memory."""
