"""Local delivery end to end: real SMTP clients in, mailboxes read back with stdlib mailbox."""

from __future__ import annotations

import concurrent.futures
import mailbox
import shutil
import smtplib
import subprocess
from email import message_from_bytes

import aiosmtplib
import pytest

BODY = (
    b"Subject: hello\r\nFrom: Sender <sender@remote.test>\r\nTo: alice@example.test\r\n\r\n"
    b"first line\r\n.leading dot\r\n..two dots\r\n.\tdot tab\r\nFrom the start\r\n>From quoted\r\n"
    b"last line\r\n"
)


def maildir(server, user: str) -> mailbox.Maildir:
    return mailbox.Maildir(server.config.local.mail_dir / user, factory=None, create=False)


def mbox(server, user: str) -> mailbox.mbox:
    return mailbox.mbox(server.config.local.mail_dir / user, create=False)


def send(port: int, rcpts: list[str], data: bytes = BODY, sender: str = "sender@remote.test") -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        return s.sendmail(sender, rcpts, data)


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\n\n", 1)[1]


def test_maildir_delivery_keeps_body_and_adds_trace_headers(serve):
    server = serve()
    assert send(server.port, ["alice@example.test"]) == {}
    assert len(maildir(server, "alice")) == 1
    raw = maildir(server, "alice").get_bytes(next(iter(maildir(server, "alice").keys())))
    # The body, byte for byte (LF endings as stored; dot-stuffing undone).
    assert body_of(raw) == body_of(BODY.replace(b"\r\n", b"\n"))
    msg = message_from_bytes(raw)
    assert msg["Return-Path"] == "<sender@remote.test>"
    assert msg["Delivered-To"] == "alice@example.test"
    received = msg.get_all("Received")
    assert len(received) == 1 and "by mx.example.test (monomail)" in received[0]
    assert "for <alice@example.test>" in received[0]
    # Trace fields are on top (RFC 5321 §4.4): Return-Path first, Received before the original.
    assert list(msg.keys())[:3] == ["Return-Path", "Delivered-To", "Received"]
    assert msg["Subject"] == "hello"
    assert not list((server.config.server.spool_dir).glob("*.json")), "spool must be empty"


def test_mbox_delivery_quotes_from_lines(serve):
    server = serve()
    assert send(server.port, ["bob@example.test"]) == {}
    assert send(server.port, ["bob@example.test"], BODY.replace(b"hello", b"second")) == {}
    box = mbox(server, "bob")
    msgs = list(box)
    assert [m["Subject"] for m in msgs] == ["hello", "second"]
    payload = msgs[0].get_payload(decode=False)
    # mboxrd: "From " → ">From ", ">From " → ">>From "; Python's mbox reader leaves quoting as is.
    assert "\n>From the start\n" in payload
    assert "\n>>From quoted\n" in payload
    assert payload.startswith("first line\n.leading dot\n..two dots\n")
    assert msgs[0].get_from().startswith("sender@remote.test ")
    assert msgs[0]["Return-Path"] == "<sender@remote.test>"
    raw = (server.config.local.mail_dir / "bob").read_bytes()
    assert raw.startswith(b"From sender@remote.test ")
    assert raw.count(b"\nFrom ") == 1 and raw.endswith(b"last line\n\n")
    assert not (server.config.local.mail_dir / "bob.lock").exists()


async def test_aiosmtplib_client_and_null_sender(serve):
    server = serve()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo()
    assert (await client.mail("")).code == 250
    assert (await client.rcpt("alice@example.test")).code == 250
    reply = await client.data(b"Subject: bounce\r\n\r\nbody\r\n")
    assert reply.code == 250 and reply.message.startswith("2.0.0")
    await client.quit()
    box = maildir(server, "alice")
    (msg,) = list(box)
    assert msg["Return-Path"] == "<>"


def test_smtputf8_address_and_8bit_body(serve):
    server = serve()
    data = "Subject: caf\u00e9\r\n\r\nna\u00efve body \u2713\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo()
        assert s.has_extn("smtputf8") and s.has_extn("8bitmime")
        s.sendmail("j\u00f6rg@remote.test", ["alice@example.test"], data, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    (raw,) = [maildir(server, "alice").get_bytes(k) for k in maildir(server, "alice").iterkeys()]
    assert "na\u00efve body \u2713".encode() in raw
    assert "Return-Path: <j\u00f6rg@remote.test>".encode() in raw


def test_unknown_user_is_refused_at_rcpt(serve):
    server = serve()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo()
        s.mail("sender@remote.test")
        code, text = s.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = s.rcpt("alice@example.test")
        assert (code, text[:5]) == (250, b"2.1.5")


def test_nested_aliases_tags_and_case(serve):
    server = serve()
    # all -> team -> (alice, bob) + carol; alice also listed directly: one copy each.
    assert send(server.port, ["all@example.test", "ALICE+News@Example.TEST", "carol@localhost"]) == {}
    assert len(maildir(server, "alice")) == 1
    assert len(mbox(server, "bob")) == 1
    assert len(maildir(server, "carol")) == 1
    assert send(server.port, ["bob+lists@example.test"]) == {}
    assert len(mbox(server, "bob")) == 2


def test_alias_loop_is_reported_not_hung(serve):
    server = serve(aliases={"loop1": ["loop2"], "loop2": ["loop1"], "self": ["self", "alice"]})
    assert "aliases.loop1: alias loop" in server.config.warnings
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo()
        s.mail("sender@remote.test")
        code, text = s.rcpt("loop1@example.test")
        assert (code, text[:5]) == (550, b"5.4.6")
        code, text = s.rcpt("self@example.test")
        assert (code, text[:5]) == (550, b"5.4.6")


def test_500_messages_from_20_sessions_into_one_mbox(serve):
    server = serve()
    per_session = 25

    def session(n: int) -> int:
        ok = 0
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
            for i in range(per_session):
                tag = f"{n:02d}-{i:02d}"
                body = (f"Subject: msg {tag}\r\nX-Tag: {tag}\r\n\r\n" + f"line {tag} of 40\r\n" * 40
                        + f"From {tag}\r\nend {tag}\r\n").encode()
                if s.sendmail("sender@remote.test", ["bob@example.test"], body) == {}:
                    ok += 1
        return ok

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert sum(pool.map(session, range(20))) == 500
    msgs = list(mbox(server, "bob"))
    assert len(msgs) == 500
    tags = set()
    for m in msgs:
        tag = m["X-Tag"]
        tags.add(tag)
        payload = m.get_payload()
        assert payload == f"line {tag} of 40\n" * 40 + f">From {tag}\nend {tag}\n", "interleaved or damaged"
    assert len(tags) == 500


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_delivers_to_alice(serve):
    server = serve()
    out = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(server.port), "--to", "alice@example.test",
         "--from", "swaks@remote.test", "--header", "Subject: via swaks", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (msg,) = list(maildir(server, "alice"))
    assert msg["Subject"] == "via swaks"
    assert "hello from swaks" in msg.get_payload()
