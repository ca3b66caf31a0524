"""Validation of a batch call as it arrives from the wire: the checks the public API
makes before anything is routed or applied (docs/api.md#call-level-errors)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dht.core.config import NodeConfig
from dht.core.errors import InvalidArgument
from dht.core.ops import BatchCall, Op
from dht.core.placement import PartitionMap
from dht.core.wire import (
    FORMAT_VERSION,
    KEY_SIZE,
    KIND_FLOW,
    KeyArray,
    U64Array,
    affinity_keys,
    decode_clients,
    decode_keys,
    key_hashes,
    prefix_mask,
)


@dataclass(frozen=True)
class ValidatedBatch:
    """A validated batch: the canonical key records, their hashes and partitions, and
    what each key needs for the local apply."""

    call: BatchCall
    keys40: npt.NDArray[np.uint8]  # (n, 40) canonical key records (affinity: masked)
    payload_rows: npt.NDArray[np.uint8]  # (n, record size) rows of the call's payload
    hashes: U64Array
    parts: npt.NDArray[np.uint16]
    pop: int
    ttl_ms: int | None
    flows: KeyArray | None  # KEY_DTYPE view (flow ops)
    prefixes: npt.NDArray[np.uint8] | None  # (n, 16) masked prefixes (affinity ops)


def acting_pop(config: NodeConfig, pop: int) -> int:
    """The PoP a call acts for (0: this node's own)."""
    if pop == 0:
        return config.pop_id
    if config.pop_name(pop) is None:
        known = ", ".join(f"{i}={n}" for n, i in config.pops.items())
        raise InvalidArgument("pop", f"unknown PoP id {pop} (known: {known})")
    return pop


def ttl_ms_of(config: NodeConfig, ttl_s: int) -> int | None:
    """A TTL the caller asked for, within the configured bounds (None: the default)."""
    if ttl_s == 0:
        return None
    ttl = config.ttl
    ttl_ms = ttl_s * 1000
    if not ttl.min_ms <= ttl_ms <= ttl.max_ms:
        raise InvalidArgument(
            "ttl_s", f"{ttl_s} outside the allowed {ttl.min_ms // 1000}..{ttl.max_ms // 1000} s"
        )
    return ttl_ms


def validate(config: NodeConfig, table: PartitionMap, call: BatchCall) -> ValidatedBatch:
    """Check a batch call from the wire and decode its keys. Raises InvalidArgument
    (naming the field) or LimitExceeded; nothing is applied then."""
    if call.format_version != FORMAT_VERSION:
        raise InvalidArgument(
            "format_version", f"{call.format_version} is not supported (want {FORMAT_VERSION})"
        )
    if call.second_chance and call.op is not Op.LOOKUP:
        raise InvalidArgument("second_chance", f"only Lookup asks other PoPs, not {call.op.value}")
    cfg = config
    flows: KeyArray | None = None
    prefixes: npt.NDArray[np.uint8] | None = None
    if call.op.affinity:
        clients = decode_clients(call.payload, cfg.max_batch_keys)
        prefixes = prefix_mask(cfg.limits.prefix_v4, cfg.limits.prefix_v6, clients)
        if call.op is Op.SET_AFFINITY and call.pop == 0:
            raise InvalidArgument("pop", "SetAffinity needs the preferred PoP id")
        raw = affinity_keys(prefixes)
        payload_rows = clients
    else:
        flows = decode_keys(call.payload, cfg.max_batch_keys, KIND_FLOW)
        raw = call.payload
        payload_rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE)
    # Lookup and GetAffinity act for no PoP: the .proto says their pop is ignored.
    pop = config.pop_id if call.op in (Op.LOOKUP, Op.GET_AFFINITY) else acting_pop(config, call.pop)
    ttl_ms = ttl_ms_of(config, call.ttl_s)
    if call.op in (Op.CLAIM, Op.CONFIRM) and not 0 <= call.server <= 65535:
        raise InvalidArgument("server", f"{call.server} outside 0..65535")
    hashes = key_hashes(raw)
    return ValidatedBatch(
        call=call,
        keys40=np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE),
        payload_rows=payload_rows,
        hashes=hashes,
        parts=table.partitions_of(hashes),
        pop=pop,
        ttl_ms=ttl_ms,
        flows=flows,
        prefixes=prefixes,
    )
