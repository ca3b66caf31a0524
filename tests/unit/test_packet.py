"""Raw packets to flow keys (docs/api.md#packet-to-key): the key is the FLOW text's key for
the same 5-tuple in both directions, the kind follows the TCP flags, and no input bytes
raise anything but InvalidArgument."""

from __future__ import annotations

import array
import ipaddress
import struct
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht.client.decision import Packet
from dht.client.packet import MAX_EXTENSION_HEADERS, parse_packet
from dht.core.errors import InvalidArgument
from dht.core.wire import FlowKey, parse_flow

TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# --------------------------------------------------------------------------- builders


def tcp_segment(
    sport: int,
    dport: int,
    flags: int,
    *,
    options: bytes = b"",
    payload: bytes = b"",
    doff: int | None = None,
    reserved: int = 0,
) -> bytes:
    """A TCP header (data offset from ``options`` unless given) and payload."""
    assert len(options) % 4 == 0
    doff = 5 + len(options) // 4 if doff is None else doff
    return (
        struct.pack("!HHIIBBHHH", sport, dport, 1, 2, doff << 4 | reserved, flags, 65535, 0, 0)
        + options
        + payload
    )


def udp_datagram(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4_packet(
    proto: int,
    src: bytes,
    dst: bytes,
    l4: bytes,
    *,
    options: bytes = b"",
    frag: int = 0,
    ihl: int | None = None,
    total: int | None = None,
    first: int | None = None,
    tos: int = 0,
    ident: int = 0,
    ttl: int = 64,
) -> bytes:
    """An IPv4 packet; ``frag`` is the flags + fragment offset field, ``first`` overrides
    the version/IHL byte."""
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4 if ihl is None else ihl
    total = 20 + len(options) + len(l4) if total is None else total
    first = 0x40 | ihl if first is None else first
    head = struct.pack("!BBHHHBBH4s4s", first, tos, total, ident, frag, ttl, proto, 0, src, dst)
    return head + options + l4


def ext_header(kind: int, next_header: int, body: bytes) -> bytes:
    """An IPv6 extension header: ``body`` is padded out to the header's 8-byte units; a
    fragment header (44) takes the offset/flags field and identification as ``body``."""
    if kind == 44:
        return bytes([next_header, 0]) + body[:6].ljust(6, b"\0")
    units = (len(body) + 2 + 7) // 8
    return bytes([next_header, units - 1]) + body.ljust(units * 8 - 2, b"\0")


def ipv6_packet(
    proto: int,
    src: bytes,
    dst: bytes,
    l4: bytes,
    *,
    ext: tuple[tuple[int, bytes], ...] = (),
    payload_length: int | None = None,
    first_word: int = 6 << 28,
    hop_limit: int = 64,
) -> bytes:
    """An IPv6 packet with the extension headers ``ext`` ((type, body), in order)."""
    chain = [kind for kind, _ in ext] + [proto]
    headers = b"".join(ext_header(kind, chain[i + 1], body) for i, (kind, body) in enumerate(ext))
    payload = headers + l4
    plen = len(payload) if payload_length is None else payload_length
    return struct.pack("!IHBB16s16s", first_word, plen, chain[0], hop_limit, src, dst) + payload


def fragment_field(offset_units: int, more: bool) -> bytes:
    """An IPv6 fragment header's offset/flags field and an identification."""
    return struct.pack("!HI", offset_units << 3 | int(more), 0x12345678)


# --------------------------------------------------------------------------- flows


@dataclass(frozen=True)
class Flow:
    """One packet as the property tests make it: a 5-tuple plus everything the parser
    must see past (IP options, extension headers, TCP options, payload, padding)."""

    family: str  # "v4", "v6", or "mapped" (IPv6 packet, IPv4-mapped addresses)
    proto: int
    client: Address
    client_port: int
    service: Address
    service_port: int
    flags: int
    reserved: int
    ip_options: bytes
    ext: tuple[tuple[int, bytes], ...]
    tcp_options: bytes
    payload: bytes
    padding: bytes

    def text(self) -> str:
        def ep(addr: Address, port: int) -> str:
            return f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"

        name = {TCP: "tcp", UDP: "udp"}[self.proto]
        return f"{name}/{ep(self.client, self.client_port)}/{ep(self.service, self.service_port)}"

    def packet(self, *, reply: bool = False, padded: bool = True) -> bytes:
        """The client's packet, or (``reply``) the service's answer on the same flow."""
        src, sport, dst, dport = self.client, self.client_port, self.service, self.service_port
        if reply:
            src, sport, dst, dport = dst, dport, src, sport
        if self.proto == TCP:
            l4 = tcp_segment(
                sport,
                dport,
                self.flags,
                options=self.tcp_options,
                payload=self.payload,
                reserved=self.reserved,
            )
        else:
            l4 = udp_datagram(sport, dport, self.payload)
        if self.family == "v4":
            raw = ipv4_packet(self.proto, src.packed, dst.packed, l4, options=self.ip_options)
        else:
            raw = ipv6_packet(
                self.proto, _packed16(src), _packed16(dst), l4, ext=self.ext, hop_limit=255
            )
        return raw + self.padding if padded else raw

    def kind(self) -> Packet:
        if self.proto == UDP:
            return Packet.UDP
        if self.flags & (FIN | RST):
            return Packet.FIN
        if self.flags & SYN and not self.flags & ACK:
            return Packet.SYN
        return Packet.DATA


def _packed16(addr: Address) -> bytes:
    if addr.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{addr}").packed
    return addr.packed


v4_addresses = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6_addresses = (
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None)
)
ports = st.integers(1, 65535)
words = st.integers(0, 10).flatmap(lambda k: st.binary(min_size=4 * k, max_size=4 * k))
ext_headers = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([0, 43, 60]), st.binary(max_size=30)),
        # Only a first fragment (offset 0) carries the transport header.
        st.tuples(st.just(44), st.booleans().map(lambda more: fragment_field(0, more))),
    ),
    max_size=MAX_EXTENSION_HEADERS,
).map(tuple)


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    family = draw(st.sampled_from(["v4", "v6", "mapped"]))
    addrs: st.SearchStrategy[Address] = v6_addresses if family == "v6" else v4_addresses
    return Flow(
        family=family,
        proto=draw(st.sampled_from([TCP, UDP])),
        client=draw(addrs),
        client_port=draw(ports),
        service=draw(addrs),
        service_port=draw(ports),
        flags=draw(st.integers(0, 255)),
        reserved=draw(st.integers(0, 15)),
        ip_options=draw(words),
        ext=draw(ext_headers),
        tcp_options=draw(words),
        payload=draw(st.binary(max_size=64)),
        padding=draw(st.binary(max_size=16)),
    )


# --------------------------------------------------------------------------- properties


@given(flows())
def test_the_key_is_the_flow_texts_key_in_both_directions(flow: Flow) -> None:
    want = parse_flow(flow.text()).to_bytes()
    assert parse_packet(flow.packet()) == (want, flow.kind())
    key, kind = parse_packet(flow.packet(reply=True), from_client=False)
    assert key == want
    assert kind == flow.kind()
    # Read the wrong way round, it is the reversed flow (and still a valid key).
    swapped = parse_packet(flow.packet(), from_client=False)[0]
    assert FlowKey.from_bytes(swapped).to_bytes() == swapped
    assert swapped[2:20] == want[20:38] and swapped[20:38] == want[2:20]


@given(flows())
def test_any_buffer_type_gives_the_same_answer(flow: Flow) -> None:
    raw = flow.packet()
    want = parse_packet(raw)
    assert parse_packet(bytearray(raw)) == want
    assert parse_packet(memoryview(raw)) == want
    # A view into a larger frame (the link-layer header not copied off).
    assert parse_packet(memoryview(b"\xee" * 14 + raw)[14:]) == want


def test_views_of_other_shapes_are_read_as_their_bytes() -> None:
    raw = ipv4_packet(TCP, bytes([198, 51, 100, 7]), bytes([192, 0, 2, 1]), tcp_segment(1, 2, 0))
    want = parse_packet(raw)
    assert parse_packet(memoryview(array.array("H", raw))) == want
    assert parse_packet(memoryview(raw).cast("c")) == want  # type: ignore[arg-type]
    assert parse_packet(memoryview(raw).cast("B", (5, 8))) == want
    strided = memoryview(bytes(b for c in raw for b in (c, 0)))[::2]
    assert parse_packet(strided) == want


@given(flows())
def test_every_strict_prefix_is_refused(flow: Flow) -> None:
    raw = flow.packet(padded=False)
    for n in range(len(raw)):
        with pytest.raises(InvalidArgument):
            parse_packet(raw[:n])


def _check_any_outcome(data: bytes) -> None:
    """Whatever the bytes: a valid key and a kind, or InvalidArgument."""
    for from_client in (True, False):
        try:
            key, kind = parse_packet(data, from_client=from_client)
        except InvalidArgument as err:
            assert err.field and err.problem
            continue
        assert isinstance(kind, Packet)
        assert FlowKey.from_bytes(key).to_bytes() == key


@given(st.binary(max_size=200))
def test_random_bytes_give_a_key_or_invalid_argument(data: bytes) -> None:
    _check_any_outcome(data)


@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60]), st.binary(max_size=200))
def test_random_bytes_behind_a_plausible_first_byte(first: int, rest: bytes) -> None:
    _check_any_outcome(bytes([first]) + rest)


@given(flows(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_corrupted_packets_give_a_key_or_invalid_argument(
    flow: Flow, changes: list[tuple[int, int]]
) -> None:
    raw = bytearray(flow.packet())
    for at, value in changes:
        raw[at % len(raw)] = value
    _check_any_outcome(bytes(raw))


# --------------------------------------------------------------------------- examples

C4, S4 = bytes([198, 51, 100, 7]), bytes([192, 0, 2, 1])
C6 = ipaddress.IPv6Address("2001:db8::7").packed
S6 = ipaddress.IPv6Address("2001:db8::1").packed
M4C = ipaddress.IPv6Address("::ffff:198.51.100.7").packed
M4S = ipaddress.IPv6Address("::ffff:192.0.2.1").packed


def test_the_documented_example() -> None:
    raw = ipv4_packet(TCP, C4, S4, tcp_segment(51000, 443, SYN))
    key, kind = parse_packet(raw)
    flow = FlowKey(
        TCP,
        ipaddress.IPv4Address("198.51.100.7"),
        51000,
        ipaddress.IPv4Address("192.0.2.1"),
        443,
    )
    assert key == flow.to_bytes()
    assert kind is Packet.SYN
    # The IPv6 packet with IPv4-mapped addresses is the same flow.
    assert parse_packet(ipv6_packet(TCP, M4C, M4S, tcp_segment(51000, 443, SYN)))[0] == key
    six = parse_packet(ipv6_packet(UDP, C6, S6, udp_datagram(51000, 443)))
    assert six == (parse_flow("udp/[2001:db8::7]:51000/[2001:db8::1]:443").to_bytes(), Packet.UDP)


@pytest.mark.parametrize(
    ("flags", "kind"),
    [
        (SYN, Packet.SYN),
        (SYN | 0x40 | 0x80, Packet.SYN),  # ECN-setup SYN (ECE, CWR)
        (SYN | ACK, Packet.DATA),  # the service's answer is no new connection
        (ACK, Packet.DATA),
        (PSH | ACK, Packet.DATA),
        (0, Packet.DATA),
        (FIN | ACK, Packet.FIN),
        (RST, Packet.FIN),
        (RST | ACK, Packet.FIN),
        (SYN | FIN, Packet.FIN),  # nothing that ends a connection claims one
        (SYN | RST, Packet.FIN),
    ],
)
def test_kind_from_tcp_flags(flags: int, kind: Packet) -> None:
    assert parse_packet(ipv4_packet(TCP, C4, S4, tcp_segment(1000, 443, flags)))[1] is kind
    assert parse_packet(ipv6_packet(TCP, C6, S6, tcp_segment(1000, 443, flags)))[1] is kind


def test_first_fragments_and_padding_are_read() -> None:
    l4 = tcp_segment(1000, 443, ACK, payload=b"x" * 100)
    want = parse_packet(ipv4_packet(TCP, C4, S4, l4))
    # More fragments, offset 0; don't fragment; then link-layer padding past the end.
    assert parse_packet(ipv4_packet(TCP, C4, S4, l4, frag=0x2000)) == want
    assert parse_packet(ipv4_packet(TCP, C4, S4, l4, frag=0x4000) + b"\0" * 20) == want
    six = ipv6_packet(TCP, C6, S6, l4, ext=((44, fragment_field(0, True)),))
    assert parse_packet(six + b"\xff" * 7)[1] is Packet.DATA


def _error(data: bytes, *, from_client: bool = True) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        parse_packet(data, from_client=from_client)
    return err.value


ICMP_ECHO = b"\x08\0\0\0\0\1\0\1"


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        (b"", "packet", "empty"),
        (b"\x45" + b"\0" * 10, "packet", "IPv4 header"),
        (b"\x60" + b"\0" * 30, "packet", "IPv6 header"),
        (ipv4_packet(1, C4, S4, ICMP_ECHO), "protocol", "protocol 1 (ICMP)"),
        (ipv4_packet(47, C4, S4, b"\0" * 8), "protocol", "protocol 47 (GRE)"),
        (ipv4_packet(250, C4, S4, b"\0" * 8), "protocol", "protocol 250: want TCP"),
        (ipv6_packet(58, C6, S6, ICMP_ECHO), "protocol", "protocol 58 (ICMPv6)"),
        (ipv6_packet(51, C6, S6, b"\0" * 24), "protocol", "(AH)"),
        (
            ipv6_packet(59, C6, S6, b"", ext=((0, b""), (60, b""))),
            "protocol",
            "59 (IPv6 no next header)",
        ),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, ACK), frag=185), "fragment", "offset 1480"),
        (ipv4_packet(UDP, C4, S4, udp_datagram(1, 2), frag=0x2001), "fragment", "non-first"),
        (ipv4_packet(UDP, C4, S4, udp_datagram(1, 2), frag=0x1000), "fragment", "32768"),
        (
            ipv6_packet(UDP, C6, S6, udp_datagram(1, 2), ext=((44, fragment_field(1, False)),)),
            "fragment",
            "offset 8 bytes",
        ),
        (ipv4_packet(TCP, C4, S4, tcp_segment(0, 443, SYN)), "client_port", "port 0"),
        (ipv4_packet(UDP, C4, S4, udp_datagram(1000, 0)), "service_port", "port 0"),
        (ipv6_packet(TCP, C6, S6, tcp_segment(0, 443, SYN)), "client_port", "port 0"),
        (b"\x50" + b"\0" * 39, "version", "IP version 5: want 4 or 6"),
        (b"\x00" * 40, "version", "IP version 0"),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, SYN), ihl=4), "ihl", "IHL 4"),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, SYN), ihl=0), "ihl", "IHL 0"),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, SYN, doff=4)), "data_offset", "offset 4"),
        (ipv6_packet(TCP, C6, S6, tcp_segment(1, 2, SYN, doff=0)), "data_offset", "offset 0"),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, SYN, doff=15)), "packet", "TCP options"),
        (ipv4_packet(TCP, C4, S4, b"\0\1\0\2"), "packet", "TCP header"),
        (ipv4_packet(UDP, C4, S4, b"\0\1\0\2"), "packet", "UDP header"),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, 0), total=100), "total_length", "truncated"),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, 0), total=19), "total_length", "shorter"),
        (ipv4_packet(TCP, C4, S4, tcp_segment(1, 2, 0), ihl=15), "total_length", "60-byte"),
        (ipv6_packet(TCP, C6, S6, tcp_segment(1, 2, 0), payload_length=21), "payload_length", ""),
        (ipv6_packet(TCP, C6, S6, tcp_segment(1, 2, 0), payload_length=4), "packet", "TCP"),
        (ipv6_packet(TCP, M4C, S6, tcp_segment(1, 2, SYN)), "key", "mixed address families"),
        (ipv6_packet(UDP, C6, M4S, udp_datagram(1, 2)), "key", "mixed address families"),
    ],
)
def test_errors_name_the_field(data: bytes, field: str, says: str) -> None:
    err = _error(data)
    assert err.field == field, err
    assert says in err.problem, err


def test_zero_ports_are_named_by_role_in_either_direction() -> None:
    # The service's answer from port 0: its source port is the service port.
    reply = ipv4_packet(TCP, S4, C4, tcp_segment(0, 1000, SYN | ACK))
    assert _error(reply, from_client=False).field == "service_port"
    reply = ipv6_packet(UDP, S6, C6, udp_datagram(53, 0))
    assert _error(reply, from_client=False).field == "client_port"


def test_extension_headers_are_bounded() -> None:
    l4 = tcp_segment(1000, 443, SYN)
    ok = ipv6_packet(TCP, C6, S6, l4, ext=((60, b""),) * MAX_EXTENSION_HEADERS)
    assert parse_packet(ok)[1] is Packet.SYN
    too_many = ipv6_packet(TCP, C6, S6, l4, ext=((60, b""),) * (MAX_EXTENSION_HEADERS + 1))
    err = _error(too_many)
    assert err.field == "next_header" and f"more than {MAX_EXTENSION_HEADERS}" in err.problem


def test_an_extension_header_longer_than_the_packet_is_truncation() -> None:
    raw = bytearray(ipv6_packet(TCP, C6, S6, tcp_segment(1, 2, 0), ext=((0, b""),)))
    raw[41] = 200  # hop-by-hop header of 1608 bytes
    err = _error(bytes(raw))
    assert err.field == "packet" and "hop-by-hop" in err.problem


def test_reply_flow_is_not_mistaken_for_the_flow_itself() -> None:
    flow = Flow(
        family="v4",
        proto=TCP,
        client=ipaddress.IPv4Address("198.51.100.7"),
        client_port=51000,
        service=ipaddress.IPv4Address("192.0.2.1"),
        service_port=443,
        flags=SYN | ACK,
        reserved=0,
        ip_options=b"",
        ext=(),
        tcp_options=b"",
        payload=b"",
        padding=b"",
    )
    assert parse_packet(flow.packet(reply=True)) != parse_packet(flow.packet())
    assert parse_packet(flow.packet(reply=True), from_client=False) == parse_packet(flow.packet())
    mapped = replace(flow, family="mapped")
    assert (
        parse_packet(mapped.packet(reply=True), from_client=False)[0]
        == (parse_packet(flow.packet())[0])
    )
