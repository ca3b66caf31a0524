"""Key and result records: parsing, canonical form, validation messages."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht.core.errors import InvalidArgument, LimitExceeded
from dht.core.wire import (
    KEY_DTYPE,
    KEY_SIZE,
    FlowKey,
    decode_keys,
    format_flow,
    key_hashes,
    parse_flow,
    prefix_mask,
)


def test_ipv4_and_mapped_ipv6_are_the_same_key() -> None:
    a = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443")
    b = parse_flow("TCP/[::ffff:198.51.100.7]:51000/[::ffff:192.0.2.1]:443")
    assert a.to_bytes() == b.to_bytes()
    assert str(b) == "tcp/198.51.100.7:51000/192.0.2.1:443"
    assert len(a.to_bytes()) == KEY_SIZE


def test_ipv6_canonical_form() -> None:
    k = parse_flow("UDP/[2001:DB8:0:0::7]:51000/[2001:db8::1]:443")
    assert str(k) == "udp/[2001:db8::7]:51000/[2001:db8::1]:443"
    raw = k.to_bytes()
    assert raw[0] == 1 and raw[1] == 17
    assert raw[18:20] == (51000).to_bytes(2, "big")
    assert FlowKey.from_bytes(raw) == k


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("tcp/198.51.100.7:0/192.0.2.1:443", "flow.client.port"),
        ("tcp/198.51.100.7:1/192.0.2.1:65536", "flow.service.port"),
        ("sctp/198.51.100.7:1/192.0.2.1:443", "flow.protocol"),
        ("tcp/198.51.100.7:1/[2001:db8::1]:443", "key"),
        ("tcp/2001:db8::7:1/192.0.2.1:443", "flow.client"),
        ("tcp/198.51.100.7:1", "flow"),
        ("tcp/[2001:db8::7]/[2001:db8::1]:443", "flow.client"),
        ("tcp/1.2.3.4:x/1.2.3.4:5", "flow.client.port"),
    ],
)
def test_bad_flows_name_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_flow(text)
    assert err.value.field == field


addresses_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
addresses_v6 = (
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None)
)
ports = st.integers(1, 65535)


@given(
    st.sampled_from([6, 17]),
    st.booleans(),
    addresses_v4,
    addresses_v4,
    addresses_v6,
    addresses_v6,
    ports,
    ports,
)
def test_roundtrip_text_and_bytes(proto, v6, c4, s4, c6, s6, cp, sp) -> None:  # type: ignore[no-untyped-def]
    key = FlowKey(proto, c6 if v6 else c4, cp, s6 if v6 else s4, sp)
    assert parse_flow(format_flow(key)) == key
    assert FlowKey.from_bytes(key.to_bytes()) == key


def _batch(*texts: str) -> bytearray:
    return bytearray(b"".join(parse_flow(t).to_bytes() for t in texts))


def test_decode_keys_rejects_bad_records_by_index_and_field() -> None:
    good = "tcp/198.51.100.7:1000/192.0.2.1:443"
    raw = _batch(good, good)
    assert len(decode_keys(bytes(raw), 10)) == 2
    cases = {
        "keys[1].kind": (40, 9),
        "keys[1].protocol": (41, 99),
        "keys[1].client_port": (58, 0),
        "keys[1].reserved": (79, 1),
    }
    for field, (offset, value) in cases.items():
        bad = bytearray(raw)
        bad[offset] = value
        if field == "keys[1].client_port":
            bad[59] = 0
        with pytest.raises(InvalidArgument) as err:
            decode_keys(bytes(bad), 10)
        assert err.value.field == field, err.value
    mixed = bytearray(raw)
    mixed[40 + 2 + 10] = 0  # client address no longer IPv4-mapped, service still is
    with pytest.raises(InvalidArgument, match="mixed address families"):
        decode_keys(bytes(mixed), 10)
    with pytest.raises(InvalidArgument, match="not a multiple of the 40-byte"):
        decode_keys(bytes(raw[:-3]), 10)
    with pytest.raises(LimitExceeded, match="exceeds the limit of 1"):
        decode_keys(bytes(raw), 1)


def test_hashes_are_xxh3_of_the_record() -> None:
    import xxhash

    raw = bytes(
        _batch("tcp/198.51.100.7:1000/192.0.2.1:443", "udp/[2001:db8::7]:5/[2001:db8::1]:6")
    )
    h = key_hashes(raw)
    assert h.dtype == np.uint64
    assert int(h[1]) == xxhash.xxh3_64_intdigest(raw[40:80])


def test_prefix_mask() -> None:
    arr = np.zeros(2, dtype=KEY_DTYPE)
    arr[0]["caddr"] = np.frombuffer(b"\0" * 10 + b"\xff\xff" + bytes([198, 51, 100, 77]), np.uint8)
    arr[1]["caddr"] = np.frombuffer(ipaddress.IPv6Address("2001:db8:1:2:3:4:5:6").packed, np.uint8)
    out = prefix_mask(24, 64, arr["caddr"])
    assert bytes(out[0][12:]) == bytes([198, 51, 100, 0])
    assert ipaddress.IPv6Address(bytes(out[1])) == ipaddress.IPv6Address("2001:db8:1:2::")
