"""Identities and their URIs (docs/security.md#identities): one spelling each, everything
else refused with a ValueError that says what is wrong."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht.core.identity import Identity, Role, identity_uri, parse_identity_uri

SEGMENT_ALPHABET = string.ascii_letters + string.digits + "._-"
segments = st.text(SEGMENT_ALPHABET, min_size=1, max_size=64).filter(lambda s: s not in {".", ".."})
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


@st.composite
def identities(draw: st.DrawFn) -> Identity:
    role = draw(st.sampled_from(Role))
    pop = "" if role is Role.OPERATOR else draw(segments)
    return Identity(role, draw(domains), pop, draw(segments))


def test_the_three_forms() -> None:
    node = Identity(Role.NODE, "dht.local", "ams", "ams-1")
    fw = Identity(Role.FORWARDER, "dht.local", "fra", "fw")
    op = Identity(Role.OPERATOR, "dht.local", "", "admin")
    assert identity_uri(node) == "spiffe://dht.local/node/ams/ams-1"
    assert identity_uri(fw) == "spiffe://dht.local/forwarder/fra/fw"
    assert identity_uri(op) == "spiffe://dht.local/operator/admin"
    assert [parse_identity_uri(identity_uri(i)) for i in (node, fw, op)] == [node, fw, op]


def test_role_is_a_str_enum_and_identities_are_values() -> None:
    assert Role.NODE == "node" and f"{Role.FORWARDER}" == "forwarder"
    assert Identity("operator", "dht.local", "", "a").role is Role.OPERATOR  # type: ignore[arg-type]
    a = Identity(Role.NODE, "dht.local", "ams", "n1")
    assert a == Identity(Role.NODE, "dht.local", "ams", "n1") and hash(a) == hash(
        Identity(Role.NODE, "dht.local", "ams", "n1")
    )
    with pytest.raises(AttributeError):
        a.name = "n2"  # type: ignore[misc]


@given(identities())
def test_round_trip(i: Identity) -> None:
    assert parse_identity_uri(identity_uri(i)) == i


@given(st.one_of(st.text(max_size=120), st.text(max_size=120).map("spiffe://".__add__)))
def test_any_text_parses_to_its_one_spelling_or_raises_value_error(text: str) -> None:
    try:
        i = parse_identity_uri(text)
    except ValueError:
        return
    assert identity_uri(i) == text


@given(identities(), st.data())
def test_a_character_outside_the_alphabet_is_refused(i: Identity, data: st.DataObject) -> None:
    uri = identity_uri(i)
    where = data.draw(st.integers(len("spiffe://"), len(uri)))
    bad = data.draw(st.sampled_from([*"%?#@:;, /\\\u00e9\u0430\x00\n", "//", "%2F"]))
    mutated = uri[:where] + bad + uri[where:]
    with pytest.raises(ValueError):
        parse_identity_uri(mutated)


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("", "want the scheme spiffe://"),
        ("https://dht.local/node/ams/n1", "want the scheme spiffe://"),
        ("SPIFFE://dht.local/node/ams/n1", "want the scheme spiffe://"),
        ("spiffe:/dht.local/node/ams/n1", "want the scheme spiffe://"),
        ("spiffe://dht.local", "want spiffe://<cluster>/<role>/..."),
        ("spiffe://dht.local/node", "want spiffe://<cluster>/<role>/..."),
        ("spiffe://dht.local/admin/ams/n1", "unknown role 'admin'"),
        ("spiffe://dht.local/Node/ams/n1", "unknown role 'Node'"),
        ("spiffe://dht.local/node/ams", "want spiffe://<cluster>/node/<pop>/<name>"),
        ("spiffe://dht.local/node/ams/n1/x", "want spiffe://<cluster>/node/<pop>/<name>"),
        ("spiffe://dht.local/node/ams/n1/", "want spiffe://<cluster>/node/<pop>/<name>"),
        ("spiffe://dht.local/forwarder/fw", "want spiffe://<cluster>/forwarder/<pop>/<name>"),
        ("spiffe://dht.local/operator/ams/admin", "want spiffe://<cluster>/operator/<name>"),
        ("spiffe://dht.local/node//n1", "pop ''"),
        ("spiffe://dht.local/node/ams/", "name ''"),
        ("spiffe://dht.local/node/ams/..", "name '..'"),
        ("spiffe://dht.local/node/./n1", "pop '.'"),
        ("spiffe://dht.local/node/am s/n1", "pop 'am s'"),
        ("spiffe://dht.local/node/ams/n%31", "name 'n%31'"),
        ("spiffe://dht.local/node/ams/" + "x" * 65, "name 'xxx"),
        ("spiffe://dht.local/operator/a?b", "name 'a?b'"),
        ("spiffe://dht.local/operator/a#b", "name 'a#b'"),
        ("spiffe:///node/ams/n1", "trust domain ''"),
        ("spiffe://DHT.local/node/ams/n1", "trust domain 'DHT.local'"),
        ("spiffe://dht.local:443/node/ams/n1", "trust domain 'dht.local:443'"),
        ("spiffe://u@dht.local/node/ams/n1", "trust domain 'u@dht.local'"),
        ("spiffe://dht..local/node/ams/n1", "trust domain 'dht..local'"),
        ("spiffe://-dht.local/node/ams/n1", "trust domain '-dht.local'"),
        ("spiffe://dht_x.local/node/ams/n1", "trust domain 'dht_x.local'"),
        ("spiffe://" + "a" * 64 + ".local/node/ams/n1", "trust domain"),
        ("spiffe://" + ".".join(["abcdefgh"] * 30) + "/node/ams/n1", "trust domain"),
    ],
)
def test_rejections_say_what_is_wrong(uri: str, says: str) -> None:
    with pytest.raises(ValueError, match="identity URI") as err:
        parse_identity_uri(uri)
    assert says in str(err.value)


def test_non_strings_and_long_input_are_refused_briefly() -> None:
    with pytest.raises(ValueError, match="want a string"):
        parse_identity_uri(b"spiffe://dht.local/operator/a")  # type: ignore[arg-type]
    with pytest.raises(ValueError) as err:
        parse_identity_uri("spiffe://dht.local/node/ams/" + "x" * 10_000)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("admin", "dht.local", "", "a"), "role 'admin'"),
        ((Role.OPERATOR, "dht.local", "ams", "a"), "an operator belongs to no PoP"),
        ((Role.NODE, "dht.local", "", "a"), "pop ''"),
        ((Role.FORWARDER, "dht.local", "ams", "a/b"), "name 'a/b'"),
        ((Role.NODE, "Dht", "ams", "a"), "trust domain 'Dht'"),
    ],
)
def test_an_identity_that_has_no_uri_cannot_be_made(args: tuple[str, ...], says: str) -> None:
    with pytest.raises(ValueError) as err:
        Identity(*args)  # type: ignore[arg-type]
    assert says in str(err.value)
