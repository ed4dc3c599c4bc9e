"""Pure routing, address parsing and message checks: no sockets, no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import base_config

from monomail import config as config_mod
from monomail.envelope import Address, parse_path
from monomail.errors import AddressError, ReplyError, RouteError
from monomail.message import Content
from monomail.policy import check_recipient, is_trusted
from monomail.router import Mailbox, Remote, resolve, routes
from monomail.tables import FileTables


@pytest.fixture
def cfg():
    return config_mod.parse(base_config(aliases={
        "postmaster": ["alice"], "team": ["alice", "bob"], "all": ["team", "carol"],
        "ext": ["alice", "someone@remote.test"], "alice": ["alice", "copy@remote.test"],
        "l1": ["l2"], "l2": ["l1"],
    }), Path("/srv/monomail.toml"))


def route(cfg, text: str):
    return resolve(Address.from_str(text), cfg)


def test_user_and_case(cfg):
    (dest,) = route(cfg, "BOB@Example.Test")
    assert isinstance(dest, Mailbox) and dest.user == "bob" and dest.format == "mbox"
    assert dest.path == Path("/srv/mail/bob")


def test_tag_is_stripped_for_lookup_only(cfg):
    (dest,) = route(cfg, "bob+news@example.test")
    assert dest.user == "bob" and dest.address == "bob+news@example.test"


def test_nested_alias_with_remote_and_self_reference(cfg):
    dests = route(cfg, "all@example.test")  # all -> team -> alice (-> alice + copy@remote) + bob; carol
    assert sorted(d.user for d in dests if isinstance(d, Mailbox)) == ["alice", "bob", "carol"]
    assert [d.address for d in dests if isinstance(d, Remote)] == ["copy@remote.test"]
    dests = route(cfg, "alice@example.test")  # alice = ["alice", "copy@remote.test"]
    assert [type(d) for d in dests] == [Mailbox, Remote]
    assert dests[1].address == "copy@remote.test"


def test_unknown_loop_and_smuggling(cfg):
    with pytest.raises(RouteError) as e:
        route(cfg, "nobody@example.test")
    assert str(e.value.reply) == "550 5.1.1 No such user here"
    with pytest.raises(RouteError) as e:
        route(cfg, "l1@example.test")
    assert e.value.reply.status == "5.4.6"
    for bad in ("x%remote.test@example.test", "remote.test!x@example.test", '"x@remote.test"@example.test'):
        with pytest.raises(RouteError) as e:
            route(cfg, bad)
        assert e.value.reply.code == 554 and e.value.reply.status == "5.7.1"
    for odd in ("../../etc/x@example.test", "a/b@example.test", '"../x"@example.test', "..@example.test"):
        with pytest.raises(RouteError) as e:
            route(cfg, odd)
        assert e.value.reply.status == "5.1.1"


def test_relay_policy(cfg):
    assert is_trusted("127.0.0.1", cfg) and is_trusted("::1", cfg) and is_trusted("::ffff:127.0.0.5", cfg)
    assert not is_trusted("192.0.2.1", cfg)
    remote = Address("x", "remote.test")
    assert check_recipient(remote, cfg, trusted=True) == (Remote("x@remote.test", "remote.test"),)
    with pytest.raises(RouteError):
        check_recipient(remote, cfg, trusted=False)


@pytest.mark.parametrize(
    ("arg", "local", "domain", "route_"),
    [
        ("<alice@Example.TEST>", "alice", "example.test", ()),
        (" <alice@example.test> SIZE=100", "alice", "example.test", ()),
        ("alice@example.test", "alice", "example.test", ()),
        ('<"a b"@example.test>', "a b", "example.test", ()),
        ('<"x>y"@example.test>', "x>y", "example.test", ()),
        ("<@relay.test,@b.test:x@remote.test>", "x", "remote.test", ("relay.test", "b.test")),
        ("<postmaster>", "postmaster", "", ()),
        ("<user@[127.0.0.1]>", "user", "[127.0.0.1]", ()),
    ],
)
def test_parse_path(arg, local, domain, route_):
    addr, _ = parse_path(arg)
    assert (addr.local, addr.domain, addr.route) == (local, domain, route_)


def test_parse_path_null_and_params():
    addr, params = parse_path("<> SIZE=10 BODY=8BITMIME smtputf8")
    assert addr is None and params == {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}


@pytest.mark.parametrize(
    ("arg", "code"),
    [
        ("<a\udcffb@example.test>", "553 5.1.3"),  # invalid UTF-8 (surrogateescape'd)
        ("<j\u00f6rg@example.test>", "553 5.6.7"),  # UTF-8 without SMTPUTF8
        ("<a@b@c>", "553 5.1.3"),
        ("<a@-bad-.test>", "553 5.1.3"),
        ("<a@example.test", "553 5.1.3"),
        ("<a\x01@example.test>", "553 5.1.3"),
        ("<" + "a" * 65 + "@example.test>", "553 5.1.3"),
        ("<a@example.test> SIZE=", "501 5.5.4"),
    ],
)
def test_parse_path_refusals(arg, code):
    with pytest.raises(AddressError) as e:
        parse_path(arg, smtputf8=False)
    assert str(e.value.reply).startswith(code)


def test_utf8_address_with_smtputf8():
    addr, _ = parse_path("<j\u00f6rg@b\u00fccher.test> SMTPUTF8")
    assert addr.local == "j\u00f6rg" and addr.domain == "b\u00fccher.test"


def canonicalize(content: bytes) -> bytes:
    """DATA content already in hand (dot-stuffing removed, CRLF endings), checked."""
    checked = Content(len(content), dot_stuffed=False)
    checked.feed(content)
    checked.finish()
    return checked.join()


def count_received(data: bytes) -> int:
    """The loop guard's count of Received fields in the header section."""
    checked = Content(len(data), strict=False, dot_stuffed=False)
    checked.feed(data)
    checked.finish()
    return checked.received


def test_canonicalize_rejects_what_can_smuggle():
    assert canonicalize(b"a\r\nb\r\n") == b"a\nb\n"
    for bad in (b"a\nb\r\n", b"a\rb\r\n", b"a\r\n.\n", b"a\x00\r\n", b"x" * 999 + b"\r\n"):
        with pytest.raises(ReplyError) as e:
            canonicalize(bad)
        assert e.value.reply.code == 554
    assert canonicalize(b"x" * 998 + b"\r\n") == b"x" * 998 + b"\n"


def test_count_received_counts_headers_only():
    assert count_received(b"Received: a\nreceived: b\nSubject: x\n\nReceived: not a header\n") == 2


def test_postmaster_is_always_accepted():
    data = base_config()
    data["aliases"] = {"team": ["alice"]}  # no postmaster alias, no postmaster user
    cfg = config_mod.parse(data, Path("/srv/monomail.toml"))
    assert any("aliases.postmaster: not defined" in w for w in cfg.warnings)
    (dest,) = route(cfg, "postmaster@example.test")
    assert isinstance(dest, Mailbox) and dest.user == next(iter(cfg.users))
    (dest,) = route(cfg, "PostMaster@localhost")
    assert isinstance(dest, Mailbox)


# -- routing once per recipient (router.routes, issue 13) --------------------------------------


def test_routes_are_kept_per_config_and_answer_as_resolve(cfg):
    a = Address.from_str("all@example.test")
    first = routes(a, cfg)
    assert first == resolve(a, cfg)
    assert routes(Address.from_str("all@example.test"), cfg) is first  # the RCPT route, used again at delivery
    assert check_recipient(a, cfg, trusted=False, sender="x@remote.test") is first
    # A new config (a reload) never gets the old one's routes.
    changed = config_mod.parse(base_config(aliases={"all": ["carol"]}), Path("/srv/monomail.toml"))
    assert [d.user for d in routes(a, changed)] == ["carol"]
    assert routes(a, cfg) is first


def test_refusals_and_routes_through_tables_are_routed_afresh(tmp_path):
    members = tmp_path / "dev.txt"
    members.write_text("alice\n")
    forward = tmp_path / "mail" / "carol" / ".forward"
    forward.parent.mkdir(parents=True)
    cfg = config_mod.parse(base_config(lists={"dev": {"members_file": str(members), "policy": "members"}},
                                       local={"allow_dot_forward": True}), tmp_path / "monomail.toml")
    tables = FileTables(cfg.local)
    dev = Address.from_str("dev@example.test")
    (post,) = check_recipient(dev, cfg, trusted=False, sender="alice@example.test", tables=tables)
    assert post.members == ("alice",)
    with pytest.raises(RouteError):  # the poster check depends on the sender: an accepted route is not kept
        check_recipient(dev, cfg, trusted=False, sender="mallory@remote.test", tables=tables)
    members.write_text("alice\nbob\n")
    (post,) = routes(dev, cfg, tables)
    assert post.members == ("alice", "bob")  # the file's change counts with the next message
    carol = Address.from_str("carol@example.test")
    assert [type(d) for d in routes(carol, cfg, tables)] == [Mailbox]
    forward.write_text("someone@remote.test\n")
    assert [type(d) for d in routes(carol, cfg, tables)] == [Remote]  # a .forward made since: used at once
    with pytest.raises(RouteError):
        routes(Address.from_str("nobody@example.test"), cfg, tables)
    with pytest.raises(RouteError):  # a refusal is not kept either
        routes(Address.from_str("nobody@example.test"), cfg, tables)
