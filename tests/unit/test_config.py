"""Configuration: TOML file + flags -> one validated frozen object; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dht.core.config import build_config, load_file
from dht.core.errors import ConfigError
from dht.core.placement import Member

TOML = """
node_id = "ams-1"
pop = "ams"
grpc_port = 7101
replication_factor = 2
[pops]
ams = 1
fra = 2
[[peers]]
node_id = "ams-2"
address = "127.0.0.1:7102"
admin_address = "127.0.0.1:8102"
[ttl]
embryonic_s = 12
established_udp_s = 30
[limits]
max_records = 1000
hard_max_records = 2000
"""


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(TOML)
    values = load_file(path)
    values["peers"].append("ams-3=127.0.0.1:7103")
    cfg = build_config(values)
    assert cfg.pop_id == 1
    assert cfg.pop_name(2) == "fra"
    assert cfg.peers == (
        Member("ams-2", "127.0.0.1:7102", "127.0.0.1:8102"),
        Member("ams-3", "127.0.0.1:7103"),
    )
    assert cfg.ttl.embryonic_ms == 12_000
    assert cfg.ttl.established_udp_ms == 30_000
    assert cfg.ttl.tombstone_extra_ms == cfg.max_clock_offset_ms
    assert cfg.limits.max_records == 1000
    assert cfg.replication_factor == 2


def test_profiles() -> None:
    docker = build_config({"node_id": "a", "pop": "ams", "profile": "docker", "insecure": True})
    assert (docker.host, docker.grpc_port, docker.admin_port, docker.peer_port) == (
        "0.0.0.0",
        7000,
        8000,
        9000,
    )
    test = build_config({"node_id": "a", "pop": "ams", "profile": "test", "grpc_port": 5})
    assert test.purge_interval_s == 0.1
    assert test.grpc_port == 5


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ({"pop": "ams"}, "node_id and pop are required"),
        ({"node_id": "a", "pop": "ams", "pops": {"fra": 2}}, "pop 'ams' is not in pops"),
        ({"node_id": "a", "pop": "ams", "colour": "red"}, "unknown configuration keys: colour"),
        ({"node_id": "a", "pop": "ams", "ttl": {"embryonic": 3}}, "unknown ttl key 'embryonic'"),
        ({"node_id": "a", "pop": "ams", "ttl": {"min_s": 10, "max_s": 5}}, "ttl bounds"),
        ({"node_id": "a", "pop": "ams", "peers": ["nonsense"]}, "want ID=HOST:PORT"),
        ({"node_id": "a", "pop": "ams", "peers": ["b=h:1,h:2,h:3,h:4"]}, "want ID=HOST:PORT"),
        # Plaintext only on loopback, unless told so (docs/security.md).
        ({"node_id": "a", "pop": "ams", "profile": "docker"}, "refusing to serve plaintext"),
        ({"node_id": "a", "pop": "ams", "host": "10.1.2.3"}, "or pass --insecure"),
        (
            {"node_id": "a", "pop": "ams", "grpc_port": 7101, "peer_port": 7101},
            "peer_port 7101 must differ",
        ),
        (
            {"node_id": "a", "pop": "ams", "tls": {"cert_file": "c", "key_file": "k"}},
            "tls needs ca_file",
        ),
        ({"node_id": "a", "pop": "ams", "peers": ["a=127.0.0.1:1"]}, "must not include this node"),
        ({"node_id": "a", "pop": "ams", "pops": {"ams": 0}}, "want 1..65535"),
        (
            {"node_id": "a", "pop": "ams", "limits": {"max_records": 5, "hard_max_records": 1}},
            "max_records",
        ),
        (
            {"node_id": "a", "pop": "ams", "replication_factor": 0},
            "replication_factor must be >= 1",
        ),
        ({"node_id": "a", "pop": "ams", "profile": "prod"}, "profile 'prod'"),
    ],
)
def test_bad_config(values: dict, text: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=text):
        build_config(values)


def test_bad_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("node_id = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_file(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_file(tmp_path / "missing.toml")
