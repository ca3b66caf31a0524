"""`dht ctl` as a real subprocess against real nodes: output, stdin, exit statuses."""

from __future__ import annotations

import asyncio
import json
import sys

from dht.tools.cluster import free_ports

from .conftest import MakePop


async def ctl(*args: str, stdin: bytes = b"") -> tuple[int, list[dict], str]:  # type: ignore[type-arg]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dht",
        "ctl",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert proc.returncode is not None
    return proc.returncode, lines, err.decode()


async def test_ctl_claim_lookup_release(make_pop: MakePop) -> None:
    nodes = await make_pop(3)
    target = nodes[1].grpc_address
    flows = [
        "tcp/198.51.100.7:51000/192.0.2.1:443",
        "UDP/[2001:DB8::7]:51000/[2001:db8::1]:443",
        "tcp/[::ffff:198.51.100.8]:1/[::ffff:192.0.2.1]:443",
    ]
    code, out, err = await ctl("--target", target, "claim", *flows, "--pop", "fra", "--ttl", "60")
    assert code == 0, err
    assert [o["status"] for o in out] == ["created"] * 3
    assert [o["flow"] for o in out] == [
        "tcp/198.51.100.7:51000/192.0.2.1:443",
        "udp/[2001:db8::7]:51000/[2001:db8::1]:443",
        "tcp/198.51.100.8:1/192.0.2.1:443",
    ]
    assert {o["owner_pop"] for o in out} == {"fra"}
    code, out, _ = await ctl(
        "--target",
        nodes[0].grpc_address,
        "lookup",
        "-",
        stdin="\n".join(flows).encode() + b"\n# comment\n\n",
    )
    assert code == 0
    assert [(o["status"], o["state"]) for o in out] == [("ok", "embryonic")] * 3
    code, out, _ = await ctl("--target", target, "confirm", flows[0], "--pop", "fra")
    assert out[0]["state"] == "established"
    code, out, _ = await ctl("--target", target, "claim", flows[0])  # default: the node's PoP, ams
    assert (out[0]["status"], out[0]["owner_pop"]) == ("owned_elsewhere", "fra")
    code, out, _ = await ctl("--target", target, "release", flows[0], "--pop", "fra")
    assert out[0]["status"] == "ok"
    code, out, _ = await ctl("--target", target, "lookup", flows[0])
    assert out[0]["status"] == "not_found"
    code, out, _ = await ctl(
        "--target", target, "affinity", "set", "198.51.100.7", "2001:db8::1", "--pop", "lon"
    )
    assert code == 0
    assert [o["owner_pop"] for o in out] == ["lon", "lon"]
    code, out, _ = await ctl("--target", target, "affinity", "get", "198.51.100.7", "198.51.100.9")
    assert [o["status"] for o in out] == ["ok", "not_found"]


async def test_ctl_bad_input_exit_2(make_pop: MakePop) -> None:
    (node,) = await make_pop(1)
    t = node.grpc_address
    for args, text in [
        (
            ("lookup", "tcp/198.51.100.7:70000/192.0.2.1:443"),
            "flow.client.port: port 70000 outside 1..65535",
        ),
        (("lookup", "tcp/198.51.100.7:0/192.0.2.1:443"), "port 0 outside"),
        (("lookup", "tcp/198.51.100.7:1/[2001:db8::1]:443"), "mixed address families"),
        (("lookup", "icmp/198.51.100.7:1/192.0.2.1:443"), "flow.protocol"),
        (("lookup", "tcp/198.51.100.7/192.0.2.1:443"), "want IPV4:PORT"),
        (
            ("claim", "tcp/198.51.100.7:1/192.0.2.1:443", "--pop", "nowhere"),
            "unknown PoP 'nowhere'",
        ),
        (("claim", "tcp/198.51.100.7:1/192.0.2.1:443", "--ttl", "999999"), "ttl_s: 999999 outside"),
        (("affinity", "get", "not-an-ip"), "client: 'not-an-ip' is not an IPv4 or IPv6 address"),
    ]:
        code, out, err = await ctl("--target", t, *args)
        assert code == 2, (args, err)
        assert text in err, (args, err)
        assert out == []
    assert len(node.node.store) == 0


async def test_ctl_unreachable_exit_1() -> None:
    (port,) = free_ports("127.0.0.1", 1)
    code, _, err = await ctl(
        "--target",
        f"127.0.0.1:{port}",
        "--timeout",
        "2",
        "lookup",
        "tcp/198.51.100.7:1/192.0.2.1:443",
    )
    assert code == 1
    assert "GetPartitionTable" in err


async def test_dht_node_bad_config_exits_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dht",
        "node",
        "--node-id",
        "a",
        "--pop",
        "ams",
        "--pops",
        "fra=2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"pop 'ams' is not in pops" in err
