"""Who is calling: the identities the cluster's certificates carry (docs/security.md#identities).

Every certificate the cluster's CA issues names one identity as a SPIFFE-style URI in its
subject alternative names:

    spiffe://<cluster>/node/<pop>/<name>        a node (name: its node id)
    spiffe://<cluster>/forwarder/<pop>/<name>   a packet forwarder of a PoP
    spiffe://<cluster>/operator/<name>          a person or tool with the admin role

``<cluster>`` is the trust domain (a DNS-like name such as ``dht.local``). Parsing is
strict: one spelling per identity, so a check against an identity is a plain comparison.
Pure: no I/O, no third-party imports (the certificates themselves are made in
``dht/tools/certs.py`` and read off a connection in ``dht/edge/identity.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

SCHEME = "spiffe://"

# Path segments: a short, file-name-safe alphabet (the segments also name the certificate
# files). "." and ".." are refused: URI normalisation would fold them away.
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Trust domain: lower-case DNS labels (SPIFFE trust domains are lower-case; one spelling).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_DOMAIN = 253


class Role(StrEnum):
    NODE = "node"
    FORWARDER = "forwarder"
    OPERATOR = "operator"


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def check_segment(what: str, value: str) -> None:
    """Raises ValueError unless value is a valid path segment (PoP or name)."""
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {_short(str(value))}: want 1-64 of [A-Za-z0-9._-], not . or ..")


def check_trust_domain(value: str) -> None:
    """Raises ValueError unless value is a valid trust domain (lower-case DNS name)."""
    ok = (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_DOMAIN
        and all(_LABEL.fullmatch(label) for label in value.split("."))
    )
    if not ok:
        raise ValueError(
            f"trust domain {_short(str(value))}: want a lower-case DNS name such as dht.local"
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """One identity. ``pop`` is "" for operators (they belong to no PoP). Construction
    validates, so every Identity has exactly one URI and parses back to itself."""

    role: Role
    cluster: str
    pop: str
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            try:
                object.__setattr__(self, "role", Role(self.role))
            except ValueError:
                raise ValueError(
                    f"role {_short(str(self.role))}: want one of {', '.join(Role)}"
                ) from None
        check_trust_domain(self.cluster)
        if self.role is Role.OPERATOR:
            if self.pop != "":
                raise ValueError(f"an operator belongs to no PoP (pop {_short(self.pop)})")
        else:
            check_segment("pop", self.pop)
        check_segment("name", self.name)


def identity_uri(i: Identity) -> str:
    """The URI a certificate carries for i (the only spelling parse_identity_uri accepts)."""
    if i.role is Role.OPERATOR:
        return f"{SCHEME}{i.cluster}/{i.role.value}/{i.name}"
    return f"{SCHEME}{i.cluster}/{i.role.value}/{i.pop}/{i.name}"


def parse_identity_uri(uri: str) -> Identity:
    """The identity a URI names. Raises ValueError, naming what is wrong, for anything but
    the exact forms in the module docstring (no query, fragment, port, user or escapes)."""
    if not isinstance(uri, str):
        raise ValueError(f"identity URI: want a string, got {type(uri).__name__}")
    if not uri.startswith(SCHEME):
        raise ValueError(f"identity URI {_short(uri)}: want the scheme {SCHEME}")
    parts = uri[len(SCHEME) :].split("/")
    if len(parts) < 3:
        raise ValueError(f"identity URI {_short(uri)}: want {SCHEME}<cluster>/<role>/...")
    cluster, role_text, rest = parts[0], parts[1], parts[2:]
    try:
        role = Role(role_text)
    except ValueError:
        raise ValueError(
            f"identity URI {_short(uri)}: unknown role {_short(role_text)}"
            f" (want one of {', '.join(Role)})"
        ) from None
    want = 1 if role is Role.OPERATOR else 2
    if len(rest) != want:
        shape = "<name>" if want == 1 else "<pop>/<name>"
        raise ValueError(f"identity URI {_short(uri)}: want {SCHEME}<cluster>/{role}/{shape}")
    pop, name = ("", rest[0]) if want == 1 else (rest[0], rest[1])
    try:
        return Identity(role, cluster, pop, name)
    except ValueError as e:
        raise ValueError(f"identity URI {_short(uri)}: {e}") from None
