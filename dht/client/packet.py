"""Raw IP packets to flow keys: what a forwarder reads off a packet before it asks the table
(docs/api.md#packet-to-key).

    key, kind = parse_packet(frame[14:])      # the bytes from the IP header on
    out = await fw.handle(key, kind)          # dht.client.Forwarder

``parse_packet`` reads an IPv4 or IPv6 packet's addresses, protocol and TCP or UDP ports
and returns the canonical 40-byte key record (the same bytes as ``FlowKey(...).to_bytes()``
for that 5-tuple; layout in protos/dht/v1/dht.proto) and the packet's kind for the
decision table (``dht.client.decision.Packet``). ``from_client`` says which way the packet
goes, so a packet and its reply give the same key.

Pure and synchronous: ``struct`` over the caller's buffer, no address objects (it runs
for every packet). A packet is untrusted input: whatever the bytes, the only exception is
``InvalidArgument``, naming the field at fault (a truncated header, a non-first fragment,
a protocol other than TCP or UDP, a zero port, ...). Checksums are not verified; that is
the NIC's or the kernel's job.
"""

from __future__ import annotations

import struct

from dht.client.decision import Packet
from dht.core.errors import InvalidArgument
from dht.core.record import TCP, UDP
from dht.core.wire import KIND_FLOW

# IPv6 extension headers walked to find the transport header, at most this many (a
# chain is bounded by the payload anyway; this bounds the work per packet too).
MAX_EXTENSION_HEADERS = 8

_HOP_BY_HOP = 0
_ROUTING = 43
_FRAGMENT = 44
_DEST_OPTS = 60
# Those of the form (next header, length in 8-byte units beyond the first 8, ...).
_OPTION_HEADERS = frozenset((_HOP_BY_HOP, _ROUTING, _DEST_OPTS))
_TRANSPORTS = frozenset((TCP, UDP))

# Names for the error messages of protocols people send and ask about.
_PROTOCOL_NAMES = {
    0: "IPv6 hop-by-hop options header",
    1: "ICMP",
    2: "IGMP",
    4: "IPv4 in IP",
    41: "IPv6 in IP",
    43: "IPv6 routing header",
    44: "IPv6 fragment header",
    47: "GRE",
    50: "ESP",
    51: "AH",
    58: "ICMPv6",
    59: "IPv6 no next header",
    60: "IPv6 destination options header",
    103: "PIM",
    112: "VRRP",
    132: "SCTP",
    135: "IPv6 mobility header",
    136: "UDP-Lite",
}

# IPv4 header: version/IHL, total length, flags/fragment offset, protocol, source,
# destination (TOS, identification, TTL and checksum skipped).
_IPV4 = struct.Struct("!BxHxxHxB2x4s4s")
# IPv6 header: payload length, next header, source and destination, each as its first 12
# bytes (the IPv4-mapped prefix or not) and its last 4.
_IPV6 = struct.Struct("!4xHBx12s4s12s4s")
# IPv6 fragment header: next header, fragment offset (13 bits) + flags (3 bits).
_IPV6_FRAGMENT = struct.Struct("!BxH4x")
# TCP: source port, destination port, data offset (upper 4 bits), flags.
_TCP = struct.Struct("!HH8xBB")
_UDP = struct.Struct("!HH")
# The key record (protos/dht/v1/dht.proto), addresses in two parts as above: an IPv4
# address is stored ::ffff:a.b.c.d, the IPv4-mapped prefix and its 4 bytes.
_KEY = struct.Struct("!BB12s4sH12s4sH2x")
assert _IPV4.size == 20 and _IPV6.size == 40 and _KEY.size == 40

_MAPPED = b"\0" * 10 + b"\xff\xff"
# What the IP layer hands the transport layer: protocol, source prefix, source (last 4
# bytes), destination prefix, destination, the transport header's offset, the end.
_Header = tuple[int, bytes, bytes, bytes, bytes, int, int]
# Module globals: an enum member read through its class costs several times more.
_KIND_FIN, _KIND_SYN, _KIND_DATA, _KIND_UDP = Packet.FIN, Packet.SYN, Packet.DATA, Packet.UDP


def parse_packet(
    data: bytes | bytearray | memoryview, *, from_client: bool = True
) -> tuple[bytes, Packet]:
    """The flow key record (40 bytes) and the kind of one IP packet.

    ``data`` starts at the IP header (IPv4 or IPv6; no link-layer header) and may run past
    the packet's own length (link-layer padding is ignored). ``from_client``: the packet
    goes client -> service (its source is the client, as at a PoP's ingress); False: it
    goes service -> client, and gives the same key as the packets it answers.

    The kind: a TCP segment with FIN or RST is ``Packet.FIN`` (even with SYN: nothing
    that ends or refuses a connection claims one), SYN without ACK is ``Packet.SYN`` (a
    SYN-ACK is the service's answer, not a new connection), any other TCP segment is
    ``Packet.DATA``, and UDP is ``Packet.UDP``.

    Raises InvalidArgument (and nothing else) for anything that is not a whole TCP or UDP
    header behind a valid IP header chain. Safe to call from any thread."""
    if type(data) is memoryview and (data.format != "B" or data.ndim != 1 or not data.c_contiguous):
        # A view of other items (or a strided one) would index and measure in items.
        data = data.tobytes()
    n = len(data)
    if not n:
        raise InvalidArgument("packet", "empty: want an IPv4 or IPv6 packet")
    version = data[0] >> 4
    if version == 4:
        proto, spre, src, dpre, dst, off, end = _ipv4(data, n)
    elif version == 6:
        proto, spre, src, dpre, dst, off, end = _ipv6(data, n)
    else:
        raise InvalidArgument("version", f"IP version {version}: want 4 or 6")

    # The transport header, inline: this runs for every packet (one call less per packet
    # is a tenth of the time).
    if proto == TCP:
        if end - off < 20:
            raise _truncated("TCP header", off + 20, end)
        sport, dport, doff, flags = _TCP.unpack_from(data, off)
        if doff < 0x50:
            raise InvalidArgument("data_offset", f"TCP data offset {doff >> 4}: below 5")
        if end - off < (doff >> 4) * 4:
            raise _truncated("TCP options", off + (doff >> 4) * 4, end)
        if flags & 0x05:  # FIN or RST
            kind = _KIND_FIN
        elif flags & 0x12 == 0x02:  # SYN, not ACK
            kind = _KIND_SYN
        else:
            kind = _KIND_DATA
    elif proto == UDP:
        if end - off < 8:
            raise _truncated("UDP header", off + 8, end)
        sport, dport = _UDP.unpack_from(data, off)
        kind = _KIND_UDP
    else:
        raise _not_transport(proto)

    if not from_client:
        spre, src, sport, dpre, dst, dport = dpre, dst, dport, spre, src, sport
    if not sport:
        raise InvalidArgument("client_port", "port 0 is not allowed (1..65535)")
    if not dport:
        raise InvalidArgument("service_port", "port 0 is not allowed (1..65535)")
    return _KEY.pack(KIND_FLOW, proto, spre, src, sport, dpre, dst, dport), kind


def _ipv4(data: bytes | bytearray | memoryview, n: int) -> _Header:
    """Protocol, source and destination (the IPv4-mapped prefix and 4 bytes each), the
    transport header's offset and the packet's end."""
    if n < 20:
        raise _truncated("IPv4 header", 20, n)
    ver_ihl, total, frag, proto, src, dst = _IPV4.unpack_from(data)
    hlen = (ver_ihl & 0x0F) * 4
    if hlen < 20:
        raise InvalidArgument("ihl", f"IHL {ver_ihl & 0x0F}: below the minimum of 5 (20 bytes)")
    if total > n:
        raise InvalidArgument("total_length", f"{total} bytes, but only {n} given: truncated")
    if total < hlen:
        raise InvalidArgument("total_length", f"{total} bytes: shorter than its {hlen}-byte header")
    if frag & 0x1FFF:
        raise _later_fragment((frag & 0x1FFF) * 8)
    return proto, _MAPPED, src, _MAPPED, dst, hlen, total


def _ipv6(data: bytes | bytearray | memoryview, n: int) -> _Header:
    """Transport protocol, source and destination (the first 12 bytes and the last 4
    each), the transport header's offset (past the extension headers) and the packet's
    end."""
    if n < 40:
        raise _truncated("IPv6 header", 40, n)
    payload, nh, spre, src, dpre, dst = _IPV6.unpack_from(data)
    if (spre == _MAPPED) != (dpre == _MAPPED):
        # FlowKey's rule: an IPv4-mapped address is IPv4, and a key is of one family.
        raise InvalidArgument(
            "key", "mixed address families (one address IPv4-mapped, the other IPv6)"
        )
    end = 40 + payload
    if end > n:
        raise InvalidArgument(
            "payload_length", f"{payload} bytes, but only {n - 40} given: truncated"
        )
    off = 40
    seen = 0
    while nh not in _TRANSPORTS:
        seen += 1
        if seen > MAX_EXTENSION_HEADERS:
            raise InvalidArgument(
                "next_header", f"more than {MAX_EXTENSION_HEADERS} IPv6 extension headers"
            )
        if nh in _OPTION_HEADERS:
            if end - off < 8:
                raise _truncated(_PROTOCOL_NAMES[nh], off + 8, end)
            size = (data[off + 1] + 1) * 8
            if end - off < size:
                raise _truncated(_PROTOCOL_NAMES[nh], off + size, end)
            nh = data[off]
            off += size
        elif nh == _FRAGMENT:
            if end - off < 8:
                raise _truncated(_PROTOCOL_NAMES[_FRAGMENT], off + 8, end)
            nh, frag = _IPV6_FRAGMENT.unpack_from(data, off)
            if frag & 0xFFF8:
                raise _later_fragment(frag & 0xFFF8)
            off += 8
        else:
            raise _not_transport(nh)
    return nh, spre, src, dpre, dst, off, end


def _truncated(what: str, need: int, have: int) -> InvalidArgument:
    return InvalidArgument(
        "packet", f"truncated: the {what} ends at byte {need}, the packet at byte {have}"
    )


def _later_fragment(offset: int) -> InvalidArgument:
    return InvalidArgument(
        "fragment", f"a non-first fragment (offset {offset} bytes) carries no ports"
    )


def _not_transport(proto: int) -> InvalidArgument:
    name = _PROTOCOL_NAMES.get(proto)
    named = f"{proto} ({name})" if name else str(proto)
    return InvalidArgument("protocol", f"protocol {named}: want TCP (6) or UDP (17)")
