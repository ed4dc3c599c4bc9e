"""Why mail waits, wherever it is shown: ``monomail queue list``, ``queue show`` and the
final bounce carry the last reply, its cause and the remote host; the give-up bounce
says it gave up (and promises no retry). A real DNS server and SMTP peer on loopback."""

from __future__ import annotations

import email
import mailbox
import smtplib

import conftest
import pytest
from conftest import Clock, cli, wait_until
from peers import SMTPPeer

BODY = b"Subject: why wait\r\nFrom: alice@example.test\r\n\r\nbody\r\n"


@pytest.fixture
def peer(port):
    p = SMTPPeer("127.0.0.2", port, rcpt_replies={"temp": "450 4.2.0 try later"}).start()
    yield p
    p.stop()


def relay(serve, dns, port, clock=None, **overrides):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    return conftest.relay(serve, dns, port, clock, remote={"connect_timeout": "1s"}, **overrides)


def test_queue_list_and_show_give_reply_cause_and_host(serve, dns, port, peer):
    server = relay(serve, dns, port, queue={"retry": ["1h"]})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("alice@example.test", ["temp@remote.test"], BODY) == {}
    cfg = str(server.config.path)
    listed = cli("queue", "list", "-c", cfg)
    assert listed.returncode == 0, listed.stderr
    assert "remote host: mx1.remote.test" in listed.stdout
    assert "last reply: 450 4.2.0 try later" in listed.stdout
    assert "deferred <temp@remote.test>  attempts 1" in listed.stdout
    assert "cause: " in listed.stdout
    (qid,) = [p.stem for p in server.config.server.spool_dir.glob("*.json")]
    shown = cli("queue", "show", qid, "-c", cfg)
    assert shown.returncode == 0, shown.stderr
    assert "<temp@remote.test> deferred, attempts 1" in shown.stdout
    assert "last reply: 450 4.2.0 try later" in shown.stdout and "remote host: mx1.remote.test" in shown.stdout
    assert "next attempt in " in shown.stdout


def test_give_up_bounce_says_so_and_promises_no_retry(serve, dns, port):
    """Nobody listens at the MX: the message is deferred until it grows too old, then
    bounced with the last reply, and without "will retry"."""
    clock = Clock()
    server = relay(serve, dns, port, clock=clock, queue={"retry": ["1h"], "give_up_after": "5d", "warn_after": ""})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("alice@example.test", ["x@remote.test"], BODY) == {}
    spool = server.config.server.spool_dir
    assert len(list(spool.glob("*.json"))) == 1
    clock.offset = 5 * 86400 + 60  # five days later
    server.loop.call_soon_threadsafe(server.app.queue.flush)
    maildir = server.config.local.mail_dir / "alice"
    wait_until(lambda: not list(spool.glob("*.json")) and (maildir / "new").is_dir()
               and len(mailbox.Maildir(maildir, factory=None, create=False)) == 1)
    box = mailbox.Maildir(maildir, factory=None, create=False)
    [raw] = [box.get_bytes(k) for k in box.iterkeys()]
    dsn = email.message_from_bytes(raw)
    text, status, _ = dsn.get_payload()
    explanation = text.get_payload(decode=True).decode()
    assert "<x@remote.test>: gave up after 5d; last error: 451 4.4." in explanation
    (block,) = status.get_payload()[1:]
    assert block["Action"] == "failed" and block["Status"].startswith("4.4.")
    assert " ".join(block["Diagnostic-Code"].split()).startswith("smtp; 451 4.4.")  # folded when long
    assert "will retry" not in raw.decode().lower()
