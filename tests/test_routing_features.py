"""Virtual domains, forwarding, mailing lists, masquerading and `monomail route`, end to end.

Real mail goes through a real server; local copies are read back with the stdlib
``mailbox`` module, remote copies are captured by SMTP peers on 127.0.0.x with MX
answers from a DNS server on loopback.
"""

from __future__ import annotations

import email
import logging
import mailbox
import smtplib
import time
from typing import Any

import pytest
from conftest import cli, wait_until, write_config
from peers import SMTPPeer

MSG = b"From: Poster <poster@outside.test>\r\nSubject: hello list\r\n\r\nbody text\r\n"


@pytest.fixture
def peer(dns, port):
    for domain in ("remote.test", "d0.test", "d1.test", "d2.test", "d3.test", "d4.test"):
        dns.mx(domain, (10, "mx.peer.test"))
    dns.a("mx.peer.test", "127.0.0.2")
    p = SMTPPeer("127.0.0.2", port, rcpt_replies={"bad": "550 5.1.1 no such user"}).start()
    yield p
    p.stop()


def start(serve, dns, port, **overrides: Any):
    return serve(dns={"nameservers": [dns.address], "timeout": "2s"},
                 remote={"port": port, "connect_timeout": "2s"}, **overrides)


def send(server, rcpts: list[str], sender: str = "poster@outside.test", data: bytes = MSG) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        for r in rcpts:
            code, text = s.rcpt(r)
            if code != 250:
                return code, text
        return s.data(data)


def rcpt_reply(server, rcpt: str, sender: str = "poster@outside.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        s.mail(sender)
        return s.rcpt(rcpt)


def box(server, user: str) -> list[email.message.Message]:
    cfg = server.config.users[user]
    if cfg.mailbox_format == "mbox":
        return list(mailbox.mbox(cfg.path)) if cfg.path.exists() else []
    if not (cfg.path / "new").is_dir():
        return []
    md = mailbox.Maildir(cfg.path, factory=None, create=False)
    return [email.message_from_bytes(md.get_bytes(k)) for k in sorted(md.keys())]


def spool_empty(server) -> bool:
    return not list(server.config.server.spool_dir.glob("*.json"))


# -- virtual domains ------------------------------------------------------------------------


def test_virtual_domain_table_catch_all_and_unknown(serve, dns, port, peer):
    server = start(serve, dns, port, virtual={
        "shop.test": {"sales": ["alice", "carol@remote.test"], "*": ["bob"]},
        "strict.test": {"info": ["alice"]},
    })
    assert send(server, ["sales@shop.test"])[0] == 250
    assert [m["Delivered-To"] for m in box(server, "alice")] == ["alice@example.test"]
    assert peer.received[0].rcpt_tos == ["carol@remote.test"]
    assert send(server, ["anything@shop.test"])[0] == 250  # the catch-all
    assert len(box(server, "bob")) == 1
    code, text = rcpt_reply(server, "nobody@strict.test")  # no catch-all: refused at RCPT
    assert (code, text[:5]) == (550, b"5.1.1")
    assert send(server, ["sales+promo@shop.test"])[0] == 250  # tags work in virtual tables too
    assert len(box(server, "alice")) == 2
    # postmaster@ every domain we serve is accepted (RFC 5321 4.5.1)
    assert send(server, ["postmaster@strict.test"])[0] == 250
    assert len(box(server, "alice")) == 3


def test_virtual_domains_are_ours_for_relay_control(serve, dns, port, peer):
    server = start(serve, dns, port, virtual={"shop.test": {"sales": ["alice"]}},
                   server={"trusted_networks": ["192.0.2.0/24"]})
    assert rcpt_reply(server, "sales@shop.test")[0] == 250
    code, text = rcpt_reply(server, "x@remote.test")
    assert (code, text[:5]) == (554, b"5.7.1")


# -- forwarding -------------------------------------------------------------------------------


def test_forward_with_copy_and_sender_rewrite(serve, dns, port, peer):
    server = start(serve, dns, port, forward={"bob": {"to": ["bob@remote.test"], "keep_copy": True},
                                              "carol": {"to": ["carol@remote.test"]}})
    assert send(server, ["bob@example.test"], sender="someone@outside.test")[0] == 250
    assert send(server, ["carol@example.test"], sender="alice@example.test")[0] == 250
    peer.wait_for(2)
    by_rcpt = {r.rcpt_tos[0]: r for r in peer.received}
    # A foreign sender would fail the forward target's SPF check: rewritten to the forwarder.
    assert by_rcpt["bob@remote.test"].mail_from == "bob@example.test"
    # One of our own senders is safe to keep.
    assert by_rcpt["carol@remote.test"].mail_from == "alice@example.test"
    assert len(box(server, "bob")) == 1  # keep_copy
    assert box(server, "carol") == []  # no copy
    assert box(server, "bob")[0]["Return-Path"] == "<someone@outside.test>"


def test_dot_forward_file_when_allowed_and_reread(serve, dns, port, peer, tmp_path):
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    dot_forward = tmp_path / "mail" / "carol" / ".forward"
    dot_forward.write_text("# my forward\ncarol@remote.test, \\carol\n")
    server = start(serve, dns, port, local={"allow_dot_forward": True})
    assert send(server, ["carol@example.test"])[0] == 250
    assert peer.wait_for(1)[0].rcpt_tos == ["carol@remote.test"]
    assert len(box(server, "carol")) == 1  # \carol: keep a copy
    dot_forward.write_text("other@remote.test\n")  # edited: takes effect with the next message
    time.sleep(0.01)
    assert send(server, ["carol@example.test"])[0] == 250
    assert peer.wait_for(2)[1].rcpt_tos == ["other@remote.test"]
    assert len(box(server, "carol")) == 1


def test_dot_forward_ignored_unless_allowed(serve, dns, port, peer, tmp_path):
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    (tmp_path / "mail" / "carol" / ".forward").write_text("carol@remote.test\n")
    server = start(serve, dns, port)
    assert send(server, ["carol@example.test"])[0] == 250
    assert len(box(server, "carol")) == 1 and peer.received == []


# -- mailing lists -----------------------------------------------------------------------------


def test_list_posting_headers_policy_and_loop_guard(serve, dns, port, peer):
    server = start(serve, dns, port, lists={
        "dev": {"address": "dev@example.test", "members": ["alice", "bob", "carol@remote.test"],
                "policy": "members", "owner": ["carol"]},
        "news": {"address": "news@example.test", "members": ["alice"], "policy": "announce",
                 "posters": ["boss@example.test"]},
    })
    # A member posts: every member gets a copy with the List-* headers.
    assert send(server, ["dev@example.test"], sender="alice@example.test")[0] == 250
    wait_until(lambda: len(box(server, "alice")) == 1 and len(box(server, "bob")) == 1 and peer.received)
    copy = box(server, "alice")[0]
    assert copy["List-Id"] == "<dev.example.test>"
    assert copy["List-Post"] == "<mailto:dev@example.test>"
    assert copy["List-Unsubscribe"] == "<mailto:dev-request@example.test?subject=unsubscribe>"
    assert copy["Return-Path"] == "<dev-bounces@example.test>"
    remote = peer.received[0]
    assert remote.mail_from == "dev-bounces@example.test" and b"List-Id: <dev.example.test>" in remote.data
    # A non-member is refused at RCPT time (members policy), so nothing is sent.
    code, text = rcpt_reply(server, "dev@example.test", sender="stranger@outside.test")
    assert (code, text[:5]) == (550, b"5.7.1")
    # announce: only the listed posters.
    assert rcpt_reply(server, "news@example.test", sender="alice@example.test")[0] == 550
    assert rcpt_reply(server, "news@example.test", sender="boss@example.test")[0] == 250
    # A message that already went through the list is not sent to it again.
    looped = b"List-Id: <dev.example.test>\r\n" + MSG
    assert send(server, ["dev@example.test"], sender="alice@example.test", data=looped)[0] == 250
    time.sleep(0.5)
    assert len(box(server, "alice")) == 1 and len(box(server, "bob")) == 1 and len(peer.received) == 1
    # -owner and -request reach the owner
    assert send(server, ["dev-owner@example.test", "dev-request@example.test"])[0] == 250
    assert len(box(server, "carol")) == 1


def test_members_file_is_reread_when_it_changes(serve, dns, port, peer, tmp_path):
    members = tmp_path / "dev.txt"
    members.write_text("# members\nalice\n")
    server = start(serve, dns, port, lists={"dev": {"members_file": str(members)}})
    assert send(server, ["dev@example.test"])[0] == 250
    wait_until(lambda: len(box(server, "alice")) == 1)
    members.write_text("bob\n")
    time.sleep(0.01)
    assert send(server, ["dev@example.test"])[0] == 250
    wait_until(lambda: len(box(server, "bob")) == 1)
    assert len(box(server, "alice")) == 1


def test_list_of_200_members_150_local_50_remote(serve, dns, port, peer, tmp_path):
    """Acceptance 2: 150 local deliveries, 5 outbound transactions, List-* headers, and a
    member's 550 bounces to the list's bounce address (its owner), not to the poster."""
    users = {f"u{i:03d}": {} for i in range(150)}
    users.update({"alice": {}, "bob": {"mailbox_format": "mbox"}, "carol": {}, "owner": {}})
    remote = [f"m{i}@d{i % 5}.test" for i in range(49)] + ["bad@d0.test"]
    members = [*(f"u{i:03d}" for i in range(150)), *remote]
    server = start(serve, dns, port, users=users,
                   lists={"big": {"address": "big@example.test", "members": members, "owner": ["owner"]}})
    t0 = time.monotonic()
    code, text = send(server, ["big@example.test"], sender="poster@outside.test")
    assert code == 250, text
    wait_until(lambda: all(len(box(server, f"u{i:03d}")) == 1 for i in range(150)))
    wait_until(lambda: len(peer.received) == 5 and spool_empty(server))
    elapsed = time.monotonic() - t0
    assert sorted(len(r.rcpt_tos) for r in peer.received) == [9, 10, 10, 10, 10]  # bad@d0 refused
    assert {r.rcpt_tos[0].split("@")[1] for r in peer.received} == {f"d{i}.test" for i in range(5)}
    assert all(r.mail_from == "big-bounces@example.test" for r in peer.received)
    assert all(b"List-Id: <big.example.test>" in r.data for r in peer.received)
    copy = box(server, "u042")[0]
    assert copy["List-Id"] == "<big.example.test>" and copy["Subject"] == "hello list"
    # The 550 for bad@d0.test: a DSN to big-bounces@ → the list owner; nothing to the poster.
    wait_until(lambda: len(box(server, "owner")) == 1)
    dsn = box(server, "owner")[0]
    assert dsn.get_content_type() == "multipart/report"
    blocks = dsn.get_payload()[1].get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; bad@d0.test"]
    assert dsn["Delivered-To"] == "owner@example.test"
    print(f"200-member list: {elapsed:.2f}s from DATA to the last remote transaction")


# -- masquerading -------------------------------------------------------------------------------


def test_masquerading_only_outbound_and_never_exceptions(serve, dns, port, peer):
    server = start(serve, dns, port, masquerade={"domains": ["example.test"], "exceptions": ["root"]})
    data = (b"From: Joe <joe@host.sub.example.test>\r\nSender: joe@host.sub.example.test\r\n"
            b"To: x@remote.test\r\nSubject: masq\r\n\r\nbody joe@host.sub.example.test\r\n")
    assert send(server, ["x@remote.test", "alice@example.test"], sender="joe@host.sub.example.test",
                data=data)[0] == 250
    out = peer.wait_for(1)[0]
    assert out.mail_from == "joe@example.test"
    assert b"From: Joe <joe@example.test>\r\n" in out.data and b"Sender: joe@example.test\r\n" in out.data
    assert b"body joe@host.sub.example.test" in out.data  # only From:/Sender:, never the body
    local = box(server, "alice")[0]  # a local delivery is not rewritten
    assert local["From"] == "Joe <joe@host.sub.example.test>"
    assert local["Return-Path"] == "<joe@host.sub.example.test>"
    root = data.replace(b"joe@", b"root@")
    assert send(server, ["x@remote.test"], sender="root@host.sub.example.test", data=root)[0] == 250
    out = peer.wait_for(2)[1]
    assert out.mail_from == "root@host.sub.example.test" and b"From: Joe <root@host.sub.example.test>" in out.data


# -- tags -------------------------------------------------------------------------------------


def test_tag_is_visible_in_delivered_to_and_log(serve, dns, port, caplog):
    caplog.set_level(logging.INFO, logger="monomail.mail")
    server = start(serve, dns, port)
    assert send(server, ["alice+news@example.test"])[0] == 250
    assert box(server, "alice")[0]["Delivered-To"] == "alice+news@example.test"
    assert "to=<alice+news@example.test>" in caplog.text


# -- the address tester -----------------------------------------------------------------------


def test_route_explains_forward_into_list_into_virtual(dns, port, tmp_path):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    path = write_config(
        tmp_path,
        dns={"nameservers": [dns.address], "timeout": "2s"},
        remote={"port": port},
        forward={"bob": {"to": ["dev@example.test"], "keep_copy": True}},
        lists={"dev": {"members": ["sales@shop.test", "carol"]}},
        virtual={"shop.test": {"sales": ["alice", "x@remote.test"]}},
        aliases={"postmaster": ["alice"], "loop1": ["loop2"], "loop2": ["loop1"]},
        masquerade={"domains": ["example.test"]},
    )
    out = cli("route", "-c", str(path), "bob@example.test", "--sender", "joe@host.sub.example.test")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "bob@example.test: forward bob (keep a copy) (forward.bob)" in text
    assert "user bob (users.bob) -> mbox" in text
    assert ("dev@example.test: list dev (2 members, envelope sender <dev-bounces@example.test>)"
            " (lists.dev.members)") in text
    assert 'sales@shop.test: virtual shop.test sales (virtual."shop.test".sales)' in text
    assert "alice@example.test: user alice (users.alice) -> maildir" in text
    assert "x@remote.test: remote remote.test -> MX mx1.remote.test [127.0.0.2]" in text
    assert "envelope sender <joe@host.sub.example.test> -> <dev-bounces@example.test>" in text
    assert "masqueraded to <joe@example.test>" in text
    loop = cli("route", "-c", str(path), "loop1@example.test", "alice@example.test")
    assert loop.returncode == 2
    assert "FAILS 550 5.4.6" in loop.stdout and "aliases.loop1" in loop.stdout
    dns.nxdomain("nx.test")
    bad = cli("route", "-c", str(path), "nobody@example.test", "gone@nx.test")
    assert bad.returncode == 2 and "FAILS 550 5.1.1" in bad.stdout
    assert "gone@nx.test: remote nx.test -> cannot send: 550 5.1.2" in bad.stdout
