"""LMTP delivery (RFC 2033) into a real Dovecot: mail in over SMTP with smtplib, handed
to Dovecot's ``lmtp`` (UNIX socket or 127.0.0.1), read back over IMAP with ``imaplib``.

Dovecot is started per test with a private config (``dovecot.DovecotMail``); the tests
are skipped when it cannot run here.
"""

from __future__ import annotations

import imaplib
import mailbox
import re
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, wait_until, write_config
from dovecot import DovecotMail, running_mail_store

from monomail.config import load
from monomail.envelope import Address
from monomail.router import resolve

PASSWORD = "imap-secret"
MESSAGE = (
    b"From: Sender <bob@example.test>\r\nTo: alice@example.test, carol@example.test\r\n"
    b"Subject: by LMTP\r\nMessage-ID: <lmtp-1@example.test>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"first line\r\n.leading dot\r\n..two dots\r\n.\r\nFrom the start\r\n"
    + "caf\u00e9 8-bit\r\n".encode() + b"last line\r\n"
)
_SAVED = re.compile(r"lmtp\((\w+)@[^)]*\)<(\d+)><([^>:]+)(?::R\d+)?>: Info: .*saved mail to INBOX")


def send(port: int, rcpts: list[str], data: bytes = MESSAGE, sender: str = "bob@example.test") -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        return s.sendmail(sender, rcpts, data)


def data_reply(port: int, rcpts: list[str], data: bytes = MESSAGE, sender: str = "bob@example.test") -> bytes:
    """The server's reply to DATA (which says whether it waited for delivery or journalled)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(data)
        assert code == 250, text
        return text


def imap_messages(dv: DovecotMail, user: str) -> list[bytes]:
    """Every message in ``user``'s INBOX, as IMAP gives it (RFC822, CRLF)."""
    with imaplib.IMAP4("127.0.0.1", dv.imap_port, timeout=10) as imap:
        imap.login(user, PASSWORD)
        imap.select("INBOX", readonly=True)
        _, found = imap.search(None, "ALL")
        out = []
        for num in found[0].split():
            _, parts = imap.fetch(num, "(BODY.PEEK[])")
            out.append(next(p[1] for p in parts if isinstance(p, tuple)))
        return out


def saved(dv: DovecotMail) -> list[tuple[str, str]]:
    """(user, LMTP session) for each message Dovecot logged as saved."""
    return [(m.group(1), f"{m.group(2)}/{m.group(3)}") for m in map(_SAVED.search, dv.log_text().splitlines()) if m]


def spool_entries(server: Any) -> list[Path]:
    return list(server.config.server.spool_dir.glob("*.json"))


def headers_of(raw: bytes) -> list[bytes]:
    return [line.split(b":", 1)[0].lower() for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            if line and not line[:1].isspace()]


@pytest.fixture
def store():
    with running_mail_store({"alice": PASSWORD, "bob": PASSWORD, "carol": PASSWORD}, quota={"carol": "1K"}) as dv:
        yield dv


@pytest.fixture
def store_no_quota():
    with running_mail_store({"alice": PASSWORD, "bob": PASSWORD, "carol": PASSWORD}) as dv:
        yield dv


def test_two_users_one_transaction_each_copy_intact_over_imap(serve, store_no_quota: DovecotMail):
    dv = store_no_quota
    server = serve(lmtp={"target": f"unix:{dv.lmtp_socket}"})
    before = dv.lmtp_sessions()
    # The 250 came after Dovecot's own 250s (cut-through), not from the spool.
    assert data_reply(server.port, ["alice@example.test", "carol@example.test"]).startswith(b"2.0.0 OK delivered as")
    assert spool_entries(server) == []
    wait_until(lambda: len(saved(dv)) == 2, timeout=10)
    # One LMTP session for both: Dovecot logged one connection, and both copies were saved in
    # it (its session id, the second recipient's marked :R2).
    assert dv.lmtp_sessions() - before == 1
    assert {user for user, _ in saved(dv)} == {"alice", "carol"}
    assert len({session for _, session in saved(dv)}) == 1
    for user in ("alice", "carol"):
        (copy,) = imap_messages(dv, user)
        assert copy.endswith(MESSAGE), copy  # what the client sent, byte for byte (dot-stuffing undone)
        top = copy[: -len(MESSAGE)]
        names = headers_of(top + b"\r\n")
        # Dovecot's trace fields and ours, each once: Return-Path from MAIL FROM (not a second
        # one from monomail), Dovecot's Delivered-To, then the Received fields.
        assert names.count(b"return-path") == 1 and names[0] == b"return-path", top
        assert b"Return-Path: <bob@example.test>\r\n" in top
        assert names.count(b"delivered-to") <= 1
        assert b"by mx.example.test (monomail)" in top
    assert not (server.config.local.mail_dir / "alice").exists(), "nothing written to the local Maildir"
    assert spool_entries(server) == []


def test_one_user_over_quota_bounces_alone(serve, store: DovecotMail):
    """Over TCP this time, per user (users.<name>.lmtp): carol's quota is 1K, so Dovecot
    answers 552 5.2.2 for her at the end of DATA and 250 for alice."""
    dv = store
    target = f"127.0.0.1:{dv.lmtp_port}"
    server = serve(users={"alice": {"lmtp": target}, "bob": {"mailbox_format": "mbox"}, "carol": {"lmtp": target}})
    big = MESSAGE + b"x" * 76 + b"\r\n" * 1 + (b"y" * 76 + b"\r\n") * 40  # over 1K
    assert send(server.port, ["alice@example.test", "carol@example.test"], big) == {}
    wait_until(lambda: (server.config.local.mail_dir / "bob").exists(), timeout=10)
    (alice_copy,) = imap_messages(dv, "alice")
    assert alice_copy.endswith(big)
    assert imap_messages(dv, "carol") == []
    bounces = list(mailbox.mbox(server.config.local.mail_dir / "bob", create=False))
    assert len(bounces) == 1
    dsn = bounces[0]
    assert dsn.get_content_type() == "multipart/report"
    report = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = report.as_string()
    assert "carol@example.test" in text and "5.2.2" in text and "failed" in text.lower()
    assert "alice@example.test" not in text
    assert "Quota exceeded" in dsn.as_string()  # Dovecot's own words reach the sender
    assert spool_entries(server) == []  # nothing left to retry


def test_store_down_defers_then_delivers_when_it_is_back(serve, store_no_quota: DovecotMail):
    dv = store_no_quota
    server = serve(lmtp={"domains": {"example.test": f"unix:{dv.lmtp_socket}"}}, queue={"retry": ["1s"]})
    dv.stop()
    assert data_reply(server.port, ["alice@example.test"]).startswith(b"2.0.0 OK queued as")  # journalled
    (entry,) = spool_entries(server)
    # the real cause is kept for the retry, the log and a later bounce (no socket path in it)
    assert "connect to the LMTP store: " in entry.read_text(), entry.read_text()
    assert not (server.config.local.mail_dir / "alice").exists()
    time.sleep(1.5)  # at least one retry against the stopped store
    assert len(spool_entries(server)) == 1
    dv.start()
    wait_until(lambda: len(saved(dv)) == 1, timeout=20)
    (copy,) = imap_messages(dv, "alice")
    assert copy.endswith(MESSAGE)
    wait_until(lambda: spool_entries(server) == [], timeout=10)


def test_lmtp_precedence_user_then_domain_then_target(tmp_path: Path):
    """Pure routing: a user's own lmtp wins, then the recipient's domain, then lmtp.target;
    the RCPT TO address is always <name>@<primary domain>, one per mailbox."""
    path = write_config(
        tmp_path,
        local={"domains": ["example.test", "other.test"]},
        virtual={"shop.test": {"info": ["carol"]}},
        users={"alice": {"lmtp": "unix:/run/alice"}, "bob": {"mailbox_format": "mbox"}, "carol": {}},
        lmtp={"target": "127.0.0.1:24", "domains": {"other.test": "unix:/run/other", "shop.test": "[::1]:2424"}},
    )
    cfg = load(path)

    def where(addr: str) -> list[tuple[str, str, str]]:
        return [(str(d.lmtp.target), d.lmtp.recipient, d.lmtp.rule) for d in resolve(Address.from_str(addr), cfg)
                if d.lmtp is not None]

    assert where("alice@other.test") == [("unix:/run/alice", "alice@example.test", "users.alice.lmtp")]
    assert where("bob@other.test") == [("unix:/run/other", "bob@example.test", 'lmtp.domains."other.test"')]
    assert where("bob@example.test") == [("127.0.0.1:24", "bob@example.test", "lmtp.target")]
    assert where("info@shop.test") == [("[::1]:2424", "carol@example.test", 'lmtp.domains."shop.test"')]
    # Two addresses of one user are one copy (same key).
    a, b = (resolve(Address.from_str(x), cfg)[0] for x in ("carol@example.test", "carol+tag@example.test"))
    assert a.key == b.key == "lmtp:127.0.0.1:24:carol@example.test"


def test_route_shows_lmtp(tmp_path: Path):
    path = write_config(tmp_path, lmtp={"target": "unix:/run/dovecot/lmtp"},
                        users={"alice": {"lmtp": "127.0.0.1:2424"}, "bob": {"mailbox_format": "mbox"}, "carol": {}})
    out = cli("route", "-c", str(path), "team@example.test")
    assert out.returncode == 0, out.stderr
    assert "alice@example.test: user alice (users.alice) -> lmtp 127.0.0.1:2424 as <alice@example.test> " \
           "(users.alice.lmtp)" in out.stdout, out.stdout
    assert "-> lmtp unix:/run/dovecot/lmtp as <bob@example.test> (lmtp.target)" in out.stdout, out.stdout


@pytest.mark.parametrize("tls", ["opportunistic", "none"])
def test_starttls_when_the_store_offers_it_on_tcp(serve, tmp_path: Path, caplog: pytest.LogCaptureFixture, tls: str):
    """remote.tls applies to LMTP on TCP: STARTTLS whenever offered, unless "none"."""
    from peers import self_signed_cert

    pair = self_signed_cert(tmp_path / "cert")
    if pair is None:
        pytest.skip("no way to make a certificate here")
    with running_mail_store({"alice": PASSWORD}, tls=pair) as dv:
        server = serve(lmtp={"target": f"127.0.0.1:{dv.lmtp_port}"}, remote={"tls": tls})
        caplog.set_level("INFO", logger="monomail.lmtp")
        assert send(server.port, ["alice@example.test"]) == {}
        wait_until(lambda: len(saved(dv)) == 1, timeout=10)
        (copy,) = imap_messages(dv, "alice")
        assert copy.endswith(MESSAGE)
        used = any(f"lmtp 127.0.0.1:{dv.lmtp_port}: TLS TLSv1" in r.getMessage() for r in caplog.records)
        # Dovecot's own Received field says whether the message came over TLS.
        over_tls = b"with LMTPS" in copy.split(b"\r\n\r\n", 1)[0]
        assert (used, over_tls) == ((True, True) if tls == "opportunistic" else (False, False)), copy[:600]


# -- the client against a scripted LMTP peer (a real socket on loopback) ------------------


def _rc(**kw: Any) -> Any:
    from monomail.settings import RemoteConfig

    base = dict(port=25, tls="opportunistic", smarthost="", smarthost_username="", smarthost_password="",
                connect_timeout=2.0, command_timeout=2.0, data_timeout=2.0, max_connections=1,
                max_connections_per_domain=1, connection_idle=0.0, cut_through=0.0)
    return RemoteConfig(**{**base, **kw})  # type: ignore[arg-type]


async def _scripted(script: dict[str, bytes], seen: list[bytes], data_replies: bytes | None) -> Any:
    """An LMTP peer on 127.0.0.1: ``script`` maps a command's first word to its reply;
    after the final dot it sends ``data_replies`` (None: says nothing)."""
    import asyncio

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer ready\r\n")
        in_data = False
        while line := await reader.readline():
            seen.append(line)
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    if data_replies is not None:
                        writer.write(data_replies)
                continue
            word = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
            writer.write(script.get(word, b"354 go ahead\r\n" if word == "DATA" else b"250 2.0.0 OK\r\n"))
            if word == "DATA":
                in_data = True
            if word == "QUIT":
                break
        writer.close()

    return await asyncio.start_server(client, "127.0.0.1", 0)


def _run_scripted(script: dict[str, bytes], data_replies: bytes | None, rcpts: list[str],
                  rc: Any = None) -> tuple[list[Any], list[bytes]]:
    import asyncio

    from monomail import lmtp
    from monomail.settings import LMTPTarget

    seen: list[bytes] = []

    async def main() -> list[Any]:
        server = await _scripted(script, seen, data_replies)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await lmtp.send(LMTPTarget(None, "127.0.0.1", port), "s@x.test", rcpts,
                                   lmtp.encode(b"Subject: t\n\n.dot\nend\n"), hostname="mx.test", remote=rc or _rc())

    return asyncio.run(main()), seen


def test_client_one_reply_per_accepted_recipient_multiline_and_refusals():
    lhlo = b"250-peer\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
    results, seen = _run_scripted(
        {"LHLO": lhlo, "RCPT": b"250 2.1.5 OK\r\n"},
        b"250 2.0.0 <a@x> Saved\r\n452-4.2.2 over\r\n452 4.2.2 quota, try later\r\n",
        ["a@x.test", "b@x.test"])
    assert [r.reply.code for r in results] == [250, 452]
    assert results[1].reply.status == "4.2.2" and "over quota, try later" in results[1].reply.text
    assert seen[0] == b"LHLO mx.test\r\n" and seen[1] == b"MAIL FROM:<s@x.test> BODY=8BITMIME\r\n"
    assert b"..dot\r\n" in seen and seen.count(b"DATA\r\n") == 1  # dot-stuffed, CRLF

    # A recipient refused at RCPT (5xx: permanent for it alone) gets no DATA reply.
    results, _ = _run_scripted({"RCPT": b"550 5.1.1 no such user\r\n"}, b"250 2.0.0 ok\r\n", ["a@x.test"])
    assert results[0].reply.code == 550 and results[0].reply.status == "5.1.1"


def test_client_failures_are_temporary_and_name_the_target():
    # No answer after the final dot: timeout, temporary, for every accepted recipient.
    results, _ = _run_scripted({}, None, ["a@x.test", "b@x.test"], _rc(data_timeout=0.5))
    assert {r.reply.code for r in results} == {451}
    assert "timeout after 0.5s waiting for the reply to the end of data" in results[0].reply.text
    # 421 at RCPT ends the session: every recipient temporary.
    results, _ = _run_scripted({"RCPT": b"421 4.3.2 shutting down\r\n"}, None, ["a@x.test", "b@x.test"])
    assert [r.reply.code for r in results] == [421, 421]
    # A 5xx greeting reply to LHLO is the store's configuration: temporary, not a bounce.
    results, _ = _run_scripted({"LHLO": b"500 5.5.1 what\r\n"}, None, ["a@x.test"])
    assert results[0].reply.code == 451 and "said: 500 5.5.1 what (in reply to LHLO)" in results[0].reply.text
    # remote.tls = "required" and no STARTTLS offered: temporary, nothing sent.
    results, seen = _run_scripted({}, None, ["a@x.test"], _rc(tls="required"))
    assert results[0].reply.code == 451 and results[0].reply.status == "4.7.4"
    assert not any(line.startswith(b"MAIL") for line in seen)
    # Nobody listening.
    import asyncio
    import socket

    from monomail import lmtp
    from monomail.settings import LMTPTarget

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = asyncio.run(lmtp.send(LMTPTarget(None, "127.0.0.1", port), "", ["a@x.test"], lmtp.encode(b"x\n"),
                                    hostname="mx.test", remote=_rc()))
    assert str(results[0].reply) == f"451 4.4.1 connect to lmtp 127.0.0.1:{port}: connection refused"
    results = asyncio.run(lmtp.send(LMTPTarget(Path("/nonexistent/lmtp")), "", ["a@x.test"], lmtp.encode(b"x\n"),
                                    hostname="mx.test", remote=_rc()))
    assert results[0].reply.code == 451 and "no such file or directory" in results[0].reply.text


def test_encode_crlf_and_dots():
    from monomail.lmtp import encode

    assert encode(b".a\nb\r\n.\nc") == b"..a\r\nb\r\n..\r\nc\r\n.\r\n"
    assert encode(b"") == b".\r\n"


def test_utf8_sender_to_a_store_without_smtputf8_fails_for_good(serve, store_no_quota: DovecotMail,
                                                                caplog: pytest.LogCaptureFixture):
    """Dovecot 2.3 offers no SMTPUTF8 (and, given a UTF-8 sender anyway, writes Return-Path: <>):
    such mail fails with 5.6.7, as Postfix does, instead of reaching the store with its sender lost."""
    dv = store_no_quota
    server = serve(lmtp={"target": f"unix:{dv.lmtp_socket}"})
    caplog.set_level("INFO")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as s, pytest.raises(smtplib.SMTPDataError) as refused:
        s.sendmail("jos\u00e9@example.test", ["alice@example.test"], MESSAGE, mail_options=["SMTPUTF8"])
    # One recipient: the store's answer is the answer to DATA (cut-through), with no local path in it.
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error == b"5.6.7 the LMTP store does not offer SMTPUTF8, which this sender needs"
    assert f"lmtp unix:{dv.lmtp_socket}: 554 5.6.7" in caplog.text  # the log has the path
    assert saved(dv) == [] and imap_messages(dv, "alice") == []
    wait_until(lambda: spool_entries(server) == [], timeout=10)  # not retried
