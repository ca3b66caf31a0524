"""A history of operations on the table and the checker of what the product promises.

Every call a chaos workload makes is recorded per key as one :class:`Operation`: what
was asked (claim, confirm, release, lookup; by which client, for which PoP), when it was
invoked and when it completed (monotonic seconds), and how it ended:

* ``ok``: the call answered for the key (the record it showed, if any);
* ``fail``: it answered with a status that changes nothing (a refusal; a read that
  could not be served);
* ``unknown``: it may or may not have taken effect (UNAVAILABLE after the write was
  sent, a timeout, an exception).

:func:`check` holds the history to the model of docs/protocol.md#create-once, per key:

* **visible**: a claim or confirm acknowledged at time t (CREATED, ALREADY_OWNED by the
  acting PoP, OK) is what every look-up invoked after t answers, until a release of the
  key may have taken effect or the record may have expired (``lost`` when the look-up
  answers NOT_FOUND, ``owner`` when it names another PoP, ``replaced`` when it shows
  another claim of the same PoP: another birth);
* **one claim**: two acknowledged claims of a key show the same claim unless a release
  may have come between (``two_claims``);
* **stable**: once any call has shown a claim, a call invoked later shows that claim or
  none, unless a release may have come between (``changed``); except a look-up that ran
  beside a claim call and showed, with the same owner, another birth than the one the
  call was acknowledged with: the call's first attempt, before it was retried at another
  coordinator (see ``_first_attempt``);
* **written**: a look-up never shows an owner no claim or confirm of the key named
  before it completed (``phantom``).

A claim is identified by (owner PoP, birth stamp, birth PoP): the birth is what tells two
claims of one PoP apart. The history is written and read as JSON lines, so a failed run
can be checked again (``dht chaos --check FILE``).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from dht.core.errors import ConfigError
from dht.core.record import Status

Claim = tuple[int, int, int]  # (owner_pop, birth_hlc, birth_pop)

WRITES = ("claim", "confirm")
KINDS = ("claim", "confirm", "release", "lookup")


@dataclass(frozen=True, slots=True)
class Operation:
    key: str  # the flow, as dht.core.wire.FlowKey prints it
    kind: str  # one of KINDS
    client: str
    pop: int  # the acting PoP (0 for a look-up)
    invoke: float
    complete: float
    outcome: str  # "ok" | "fail" | "unknown"
    status: str  # the Status name answered, or the exception
    owner_pop: int = 0
    birth_hlc: int = 0
    birth_pop: int = 0
    generation: int = 0
    ttl_s: float = 0.0  # the TTL asked for (writes)

    @property
    def claim(self) -> Claim | None:
        """The claim the call showed, if it showed one."""
        if self.outcome != "ok" or not self.owner_pop:
            return None
        return (self.owner_pop, self.birth_hlc, self.birth_pop)

    @property
    def acked(self) -> bool:
        """An acknowledged claim or confirm of the acting PoP."""
        return (
            self.kind in WRITES
            and self.outcome == "ok"
            and self.status in ("CREATED", "ALREADY_OWNED", "OK")
            and self.owner_pop == self.pop
        )


def outcome_of(kind: str, status: Status) -> str:
    """How a call that answered ``status`` for a key ended (see the module docstring)."""
    if status in (Status.UNAVAILABLE, Status.MOVED, Status.UNSPECIFIED):
        return "fail" if kind == "lookup" else "unknown"
    if status in (Status.REFUSED_FULL, Status.REFUSED_QUOTA):
        return "fail"
    return "ok"


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # lost | owner | replaced | two_claims | changed | phantom
    key: str
    what: str
    ops: tuple[Operation, ...]

    def __str__(self) -> str:
        lines = [f"{self.kind}: {self.key}: {self.what}"]
        lines += [f"    {_fmt(op)}" for op in self.ops]
        return "\n".join(lines)


def _fmt(op: Operation) -> str:
    shown = f" -> {op.claim}" if op.claim else ""
    return (
        f"{op.kind} by {op.client} (pop {op.pop}) [{op.invoke:.3f}, {op.complete:.3f}] "
        f"{op.outcome} {op.status}{shown}"
    )


class History:
    def __init__(self, ops: Iterable[Operation] = ()) -> None:
        self.ops: list[Operation] = list(ops)

    def add(self, op: Operation) -> None:
        self.ops.append(op)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.ops)

    def write(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for op in self.ops:
                f.write(json.dumps(asdict(op)) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> History:
        """A history written by :meth:`write`; ConfigError naming the line if it is not one."""
        ops = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ops.append(Operation(**json.loads(line)))
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"{path}:{n}: not a history line: {e}") from None
        return cls(ops)


# The clocks of the nodes may be this far apart: an expiry is not trusted closer than this.
EXPIRY_SLACK_S = 2.0


def check(history: Iterable[Operation]) -> list[Violation]:
    """Every violation of the model in ``history`` (empty: none)."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    out: list[Violation] = []
    for key, ops in by_key.items():
        ops.sort(key=lambda o: (o.invoke, o.complete))
        out += _check_key(key, ops)
    return out


def _released_between(ops: list[Operation], start: float, end: float) -> bool:
    """A release of the key that may have taken effect after ``start`` and before
    ``end``: invoked before ``end``, and not completed by ``start`` (one with an unknown
    outcome may still take effect at any later time)."""
    return any(
        o.kind == "release"
        and o.outcome != "fail"
        and o.invoke < end
        and (o.outcome == "unknown" or o.complete > start)
        for o in ops
    )


def _check_key(key: str, ops: list[Operation]) -> list[Violation]:
    out: list[Violation] = []
    acks = [o for o in ops if o.acked]
    # one claim: acknowledged claims agree, unless a release came between.
    for a, b in itertools.pairwise(acks):
        if a.claim != b.claim and not _released_between(ops, a.invoke, b.complete):
            out.append(Violation("two_claims", key, "two claims acknowledged", (a, b)))
    for op in ops:
        if op.kind != "lookup" or op.outcome != "ok":
            continue
        # written: the owner shown was named by a claim or confirm invoked before.
        if op.claim is not None and not any(
            w.kind in WRITES and w.pop == op.owner_pop and w.invoke < op.complete for w in ops
        ):
            out.append(Violation("phantom", key, f"owner {op.owner_pop} never written", (op,)))
        # visible: the last acknowledgement before the look-up started.
        before = [a for a in acks if a.complete < op.invoke]
        if before:
            a = before[-1]
            expires = a.invoke + (a.ttl_s or float("inf")) - EXPIRY_SLACK_S
            if op.invoke < expires and not _released_between(ops, a.complete, op.complete):
                v = _visible(key, a, op)
                if v is not None:
                    out.append(v)
                    continue
    # stable: a claim once shown stays (look-ups and acknowledgements alike).
    shown = [o for o in ops if o.claim is not None]
    for b in shown:
        for a in shown:
            moved = a.complete < b.invoke and a.claim != b.claim
            if moved and _first_attempt(acks, a, b):
                continue
            if moved and not _released_between(ops, a.complete, b.complete):
                out.append(Violation("changed", key, f"{a.claim} then {b.claim}", (a, b)))
                break
    return out


def _first_attempt(acks: list[Operation], a: Operation, b: Operation) -> bool:
    """Did ``a`` show an earlier attempt of the claim call acknowledged with what ``b``
    shows? ``a`` is a look-up whose claim was never acknowledged, with the owner of
    ``b``'s claim, and a call acknowledged ``b``'s claim after running beside ``a``. A
    client's claim retried at another coordinator is born again there, and a look-up
    beside it can show the first attempt's copy (docs/protocol.md#known-limits): the owner,
    which is what the product promises, never changed."""
    if a.kind != "lookup" or a.claim is None or b.claim is None:
        return False
    if a.owner_pop != b.owner_pop or any(k.claim == a.claim for k in acks):
        return False
    return any(k.claim == b.claim and k.invoke < a.complete < k.complete for k in acks)


def _visible(key: str, ack: Operation, op: Operation) -> Violation | None:
    if op.claim is None:
        return Violation("lost", key, "acknowledged, then NOT_FOUND", (ack, op))
    if op.owner_pop != ack.owner_pop:
        return Violation("owner", key, f"acknowledged for {ack.owner_pop}", (ack, op))
    if op.claim != ack.claim:
        return Violation("replaced", key, "another claim of the same PoP shown", (ack, op))
    return None
