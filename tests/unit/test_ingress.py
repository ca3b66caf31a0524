"""The one validation of copies from the network (dht/core/ingress.py): every field is
checked per entry, a bad entry is refused on its own under one reason, good ones pass,
and the key checks are the public API's (dht.core.wire.decode_keys)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.core.config import build_config
from dht.core.errors import InvalidArgument
from dht.core.ingress import (
    MAX_FLOW_AGE_MS,
    MAX_GENERATION,
    REASONS,
    SMALL_BATCH,
    Bounds,
    _all_ok,
    check_columns,
    check_entries,
    term_bound,
)
from dht.core.record import State, Status, hlc_pack
from dht.core.wire import (
    ENTRY_DTYPE,
    KEY_DTYPE,
    affinity_keys,
    decode_keys,
    parse_flow,
)

NOW = 1_800_000_000_000
BOUNDS = Bounds(pops=frozenset({1, 2, 3}), max_clock_offset_ms=500, longest_ms=86_401_000)
KEY = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443").to_bytes()


def flow_entry(**rec: int) -> np.ndarray:
    e = np.zeros(1, dtype=ENTRY_DTYPE)
    e["key"] = np.frombuffer(KEY, dtype=KEY_DTYPE)
    values = {
        "status": Status.OK,
        "state": State.ESTABLISHED,
        "owner_pop": 1,
        "birth_pop": 1,
        "generation": 1,
        "birth_hlc": hlc_pack(NOW - 1000, 3),
        "expiry_ms": NOW + 600_000,
        **rec,
    }
    for f, v in values.items():
        e["rec"][f] = v
    return e


def affinity_entry(**rec: int) -> np.ndarray:
    e = np.zeros(1, dtype=ENTRY_DTYPE)
    prefix = np.zeros((1, 16), dtype=np.uint8)
    prefix[0, 10:13] = (0xFF, 0xFF, 198)
    e["key"] = np.frombuffer(affinity_keys(prefix), dtype=KEY_DTYPE)
    values = {
        "status": Status.OK,
        "owner_pop": 2,
        "birth_pop": 2,
        "birth_hlc": hlc_pack(NOW - 1000, 0),
        "expiry_ms": NOW + 60_000,
        **rec,
    }
    for f, v in values.items():
        e["rec"][f] = v
    return e


def reasons(e: np.ndarray, **kw: bool) -> dict[str, int]:
    return dict(check_entries(e, BOUNDS, NOW, **kw).refused)


def test_good_entries_pass() -> None:
    e = np.concatenate([flow_entry(), affinity_entry(), flow_entry(state=State.RELEASED)])
    checked = check_entries(e, BOUNDS, NOW)
    assert checked.ok.all() and checked.all_ok and checked.n_refused == 0


@pytest.mark.parametrize(
    ("rec", "reason"),
    [
        ({"state": 9}, "state"),
        ({"state": State.NONE}, "state"),
        ({"owner_pop": 77}, "owner_pop"),
        ({"owner_pop": 0}, "owner_pop"),
        ({"birth_pop": 77}, "birth_pop"),
        ({"generation": 0}, "generation"),
        ({"generation": MAX_GENERATION + 1}, "generation"),
        ({"generation": 1_000_000_000}, "generation"),
        ({"birth_hlc": hlc_pack(1, 0)}, "birth_too_old"),
        ({"birth_hlc": hlc_pack(NOW - MAX_FLOW_AGE_MS - 1, 0)}, "birth_too_old"),
        ({"birth_hlc": hlc_pack(NOW + 501, 0)}, "birth_ahead"),
        ({"birth_hlc": (1 << 64) - 1}, "birth_ahead"),
        ({"expiry_ms": 1 << 62}, "expiry_too_far"),
        ({"expiry_ms": NOW + 500 + 86_401_000 + 1}, "expiry_too_far"),
    ],
)
def test_each_bad_record_field_is_refused(rec: dict[str, int], reason: str) -> None:
    assert reasons(flow_entry(**rec)) == {reason: 1}


def test_a_long_lived_flow_keeps_its_old_birth() -> None:
    """Refreshes keep a connection's birth: a week-old birth is fine for a flow."""
    assert reasons(flow_entry(birth_hlc=hlc_pack(NOW - 7 * 86_400_000, 0))) == {}


@pytest.mark.parametrize(
    ("rec", "reason"),
    [
        ({"birth_hlc": hlc_pack(4_102_444_800_000, 0)}, "birth_ahead"),  # stamped in 2100
        ({"birth_hlc": hlc_pack(NOW - 86_401_000 - 501, 0)}, "birth_too_old"),
        ({"owner_pop": 99}, "owner_pop"),
        ({"expiry_ms": 1 << 62}, "expiry_too_far"),
        ({"state": 9}, "state"),
    ],
)
def test_affinity_records_get_the_same_clock_checks(rec: dict[str, int], reason: str) -> None:
    assert reasons(affinity_entry(**rec)) == {reason: 1}


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (0, 9, "key_kind"),
        (1, 99, "key_protocol"),
        (18, 0, "key_client_port"),
        (36, 0, "key_service_port"),
        (38, 1, "key_reserved"),
        (13, 0xFE, "key_family"),  # the client no longer IPv4-mapped, the service is
    ],
)
def test_bad_keys_are_refused_as_the_public_api_refuses_them(
    offset: int, value: int, reason: str
) -> None:
    e = flow_entry()
    raw = bytearray(e.tobytes())
    raw[offset] = value
    if reason in ("key_client_port", "key_service_port"):
        raw[offset + 1] = 0
    bad = np.frombuffer(bytes(raw), dtype=ENTRY_DTYPE)
    assert reasons(bad) == {reason: 1}
    with pytest.raises(InvalidArgument):
        decode_keys(bytes(raw[:40]), 10)


def test_affinity_keys_must_be_as_made() -> None:
    e = affinity_entry()
    e["key"]["sport"] = 443
    assert reasons(e) == {"key_service_port": 1}


def test_an_undo_before_without_a_record_checks_only_its_key() -> None:
    e = np.zeros(1, dtype=ENTRY_DTYPE)
    e["key"] = np.frombuffer(KEY, dtype=KEY_DTYPE)
    e["rec"]["status"] = Status.NOT_FOUND
    assert reasons(e, records_optional=True) == {}
    assert "state" in reasons(e)


def test_a_batch_refuses_only_its_bad_entries() -> None:
    e = np.concatenate(
        [flow_entry(), flow_entry(state=9), affinity_entry(), flow_entry(owner_pop=77)]
    )
    checked = check_entries(e, BOUNDS, NOW)
    assert checked.ok.tolist() == [True, False, True, False]
    assert dict(checked.refused) == {"state": 1, "owner_pop": 1}


def test_bounds_from_the_configuration() -> None:
    cfg = build_config(
        {"node_id": "a", "pop": "ams", "pops": {"ams": 1, "fra": 2}, "profile": "test"}
    )
    b = Bounds.of(cfg)
    assert b.pops == {1, 2}
    assert b.longest_ms == cfg.ttl.max_ms + cfg.ttl.tombstone_extra_ms
    assert b.max_clock_offset_ms == cfg.max_clock_offset_ms


def test_the_term_bound_leaves_room_below_2_to_the_64() -> None:
    bound = term_bound(500, NOW)
    assert hlc_pack(NOW + 500, 0xFFFF) < bound < (1 << 63)


# --------------------------------------------------------------------------- properties

_FIELDS = {
    "status": st.integers(0, 255),
    "state": st.integers(0, 255),
    "owner_pop": st.integers(0, 65535),
    "owner_server": st.integers(0, 65535),
    "birth_pop": st.integers(0, 65535),
    "generation": st.integers(0, 2**32 - 1),
    "partition": st.integers(0, 65535),
    "flags": st.integers(0, 65535),
    "birth_hlc": st.integers(0, 2**64 - 1),
    "expiry_ms": st.integers(0, 2**64 - 1),
}


@settings(max_examples=200, deadline=None)
@given(
    raw=st.lists(st.binary(min_size=72, max_size=72), min_size=0, max_size=20),
    optional=st.booleans(),
)
def test_any_bytes_get_a_verdict_and_counts_add_up(raw: list[bytes], optional: bool) -> None:
    e = np.frombuffer(b"".join(raw), dtype=ENTRY_DTYPE)
    checked = check_entries(e, BOUNDS, NOW, records_optional=optional)
    assert checked.ok.shape == (len(e),)
    assert checked.n_refused == int((~checked.ok).sum())
    assert set(checked.refused) <= set(REASONS)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries(_FIELDS))
def test_an_accepted_flow_copy_is_one_the_store_can_hold(rec: dict[str, int]) -> None:
    """Whatever the record fields, an accepted flow copy has a State, known PoPs, a
    generation that can be incremented within 32 bits and stamps within the bounds."""
    e = flow_entry(**rec)
    if check_entries(e, BOUNDS, NOW).all_ok:
        r = e["rec"][0]
        State(int(r["state"]))
        assert int(r["state"]) != State.NONE
        assert {int(r["owner_pop"]), int(r["birth_pop"])} <= BOUNDS.pops
        assert 1 <= int(r["generation"]) <= MAX_GENERATION < 2**32 - 1
        birth_ms = int(r["birth_hlc"]) >> 16
        assert NOW - MAX_FLOW_AGE_MS <= birth_ms <= NOW + 500
        assert int(r["expiry_ms"]) <= NOW + 500 + BOUNDS.longest_ms


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(min_size=40, max_size=40))
def test_key_checks_agree_with_decode_keys(raw: bytes) -> None:
    """One definition: a flow key the ingress accepts is one decode_keys accepts."""
    e = flow_entry()
    e["key"] = np.frombuffer(raw, dtype=KEY_DTYPE)
    key_ok = not any(r.startswith("key_") for r in reasons(e))
    try:
        decode_keys(raw, 1)
        api_ok = True
    except InvalidArgument:
        api_ok = False
    if raw[0] == 1:
        assert key_ok == api_ok
    else:
        assert not api_ok


# Field values at and around every bound the checks draw (NOW, BOUNDS), and anywhere.
_AHEAD = NOW + 500
_FAR = _AHEAD + BOUNDS.longest_ms
_EDGES = {
    "status": st.sampled_from([Status.NOT_FOUND, 255]),
    "state": st.integers(0, 5),
    "owner_pop": st.sampled_from([0, 3, 4, 65535]),
    "birth_pop": st.sampled_from([0, 3, 4]),
    "generation": st.sampled_from([0, MAX_GENERATION, MAX_GENERATION + 1, 2**32 - 1]),
    "birth_hlc": st.one_of(
        st.sampled_from(
            [
                NOW - MAX_FLOW_AGE_MS - 1,
                NOW - MAX_FLOW_AGE_MS,
                NOW - BOUNDS.longest_ms - 501,
                NOW - BOUNDS.longest_ms - 500,
                _AHEAD,
                _AHEAD + 1,
            ]
        ).map(lambda ms: hlc_pack(ms, 7)),
        st.integers(0, 2**64 - 1),
    ),
    "expiry_ms": st.one_of(st.sampled_from([0, _FAR, _FAR + 1]), st.integers(0, 2**64 - 1)),
}


@st.composite
def _entries(draw: st.DrawFn) -> np.ndarray:
    """A good flow or affinity entry with at most two things changed: record fields set
    to edge values, or one key byte (so most entries are good or a check or two away)."""
    make = flow_entry if draw(st.booleans()) else affinity_entry
    changes = draw(st.lists(st.sampled_from(["key", *_EDGES]), max_size=2, unique=True))
    e = make(**{f: draw(_EDGES[f]) for f in changes if f != "key"})
    if "key" in changes:
        raw = bytearray(e.tobytes())
        raw[draw(st.integers(0, 39))] = draw(st.sampled_from([0, 1, 2, 6, 17, 0xFF]))
        e = np.frombuffer(bytes(raw), dtype=ENTRY_DTYPE).copy()
    return e


@settings(max_examples=400, deadline=None)
@given(entries=st.lists(_entries(), min_size=1, max_size=SMALL_BATCH), optional=st.booleans())
def test_the_scalar_checks_accept_exactly_what_the_column_checks_accept(
    entries: list[np.ndarray], optional: bool
) -> None:
    """A batch of a few entries is accepted by the scalar checks only if the column
    checks accept all of it (anything else goes to the column checks, which name it)."""
    e = np.concatenate(entries)
    columns = check_columns(e, BOUNDS, NOW, records_optional=optional)
    raw = e.astype(ENTRY_DTYPE).tobytes()  # np.concatenate made the rows native-order
    assert _all_ok(raw, BOUNDS, NOW, optional) == columns.all_ok
    got = check_entries(e, BOUNDS, NOW, records_optional=optional)
    assert (got.ok.tolist(), got.refused) == (columns.ok.tolist(), columns.refused)
