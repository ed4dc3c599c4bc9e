"""No open relay (DESIGN invariant 3), over real loopback sockets with stdlib smtplib.

With ``trusted_networks`` set to a network the loopback client is not in (192.0.2.0/24,
TEST-NET-1: a config value only, no traffic goes there), every recipient that leaves
the host must be refused at RCPT with ``554 5.7.1``, whatever its disguise: ``%`` and
``!`` hacks, source routes, quoted local parts that carry another address, odd case.
Local recipients in any legal spelling are accepted and delivered to alice's Maildir,
and nothing is queued for elsewhere. With the default trusted networks (127.0.0.0/8)
a plain remote recipient is accepted, but the disguised forms are still refused.
"""

from __future__ import annotations

import mailbox
import re
import smtplib
import uuid
from pathlib import Path
from typing import Any

import pytest

TIMEOUT = 5.0
UNTRUSTED = {"trusted_networks": ["192.0.2.0/24"], "max_errors": 1000}  # many refusals in one session

RELAY_ATTEMPTS = [
    "<x@remote.test>",
    "<x@Remote.Test>",
    "<x@REMOTE.TEST>",
    "<x@remote.test.>",
    "x@remote.test",                              # no angle brackets
    "<x@example.test.remote.test>",
    "<x@[192.0.2.1]>",                            # address literals
    "<x@[IPv6:2001:db8::1]>",
    "<x%remote.test@example.test>",               # the percent hack
    "<x%remote.test>",                            # ... with our primary domain implied
    "<x%remote.test@EXAMPLE.TEST>",
    "<alice+x%remote.test@example.test>",         # behind a recipient_delimiter tag
    "<remote.test!x@example.test>",               # bang path
    "<remote.test!x>",
    "<@example.test:x@remote.test>",              # source routes
    "<@a.test,@example.test:x@remote.test>",
    "<@example.test,@localhost:x@remote.test>",
    '<"x@remote.test"@example.test>',             # quoted local parts carrying an address
    '<"x%remote.test"@example.test>',
    '<"remote.test!x"@example.test>',
    '<"x\\"@remote.test"@example.test>',
    '<"x@remote.test"@example.test.>',
    '<@example.test:"x@remote.test"@example.test>',
]

SMUGGLING_FORMS = [  # refused even from a trusted client: the local part carries an address
    "<x%remote.test@example.test>",
    "<x%remote.test>",
    "<remote.test!x@example.test>",
    '<"x@remote.test"@example.test>',
    '<"x%remote.test"@example.test>',
    '<"remote.test!x"@example.test>',
    "<alice+x%remote.test@example.test>",
]

LOCAL_FORMS = [
    "<alice@example.test>",
    "<ALICE@EXAMPLE.TEST>",
    "<Alice@Example.Test>",
    '<"alice"@example.test>',
    "<alice@example.test.>",  # a trailing dot names the same (absolute) domain: local
    "<alice@localhost>",
    "<alice>",
    "alice@example.test",
    "<alice+tag@example.test>",
    "<@remote.test:alice@example.test>",  # source route ignored (RFC 5321 §3.6.1): local
]


def marker() -> str:
    return uuid.uuid4().hex


def connect(server: Any, helo: str = "client.test") -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.port, local_hostname=helo, timeout=TIMEOUT)
    s.command_encoding = "utf-8"  # send UTF-8 addresses as they are
    code, _ = s.ehlo()
    assert code == 250
    return s


def cmd(s: smtplib.SMTP, line: str) -> tuple[int, str]:
    code, text = s.docmd(line)
    return code, text.decode("utf-8", "replace")


def expect(reply: tuple[int, str], code: int, status: str) -> None:
    assert reply[0] == code and reply[1].split(" ", 1)[0] == status, f"expected {code} {status}, got {reply}"


def alice(server: Any) -> list[bytes]:
    path = server.config.local.mail_dir / "alice"
    if not path.exists():
        return []
    box = mailbox.Maildir(path, factory=None, create=False)
    return [box.get_bytes(key) for key in box.iterkeys()]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def assert_nothing_queued(server: Any) -> None:
    assert [p for p in files_under(server.config.server.spool_dir) if p.suffix in (".json", ".msg")] == []


def assert_only_alice_got(server: Any, marks: list[str]) -> None:
    """Exactly these messages sit in alice's Maildir; no other mailbox holds anything."""
    mail_dir = server.config.local.mail_dir
    got = alice(server)
    assert sorted(m for m in marks for g in got if m.encode() in g) == sorted(marks)
    assert len(got) == len(marks)
    assert all(re.search(rb'^Delivered-To: "?alice[+"@]', g, re.MULTILINE | re.IGNORECASE) for g in got)
    assert [p for p in files_under(mail_dir) if p.parent.parent != mail_dir / "alice"] == []


def send_data(s: smtplib.SMTP, mark: str) -> tuple[int, str]:
    code, text = s.data(f"From: sender@client.test\r\nSubject: {mark}\r\n\r\nbody {mark}\r\n")
    return code, text.decode()


# -- untrusted client -----------------------------------------------------------------


@pytest.mark.parametrize("rcpt", RELAY_ATTEMPTS)
def test_untrusted_relay_attempt_refused(serve: Any, rcpt: str) -> None:
    server = serve(server=UNTRUSTED)
    mark = marker()
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        expect(cmd(s, f"RCPT TO:{rcpt}"), 554, "5.7.1")
        # The transaction goes on for a local recipient; the refused one is not in it.
        expect(cmd(s, "RCPT TO:<alice@example.test>"), 250, "2.1.5")
        code, text = send_data(s, mark)
        assert code == 250 and text.startswith("2.0.0 OK delivered as"), (code, text)
    assert_only_alice_got(server, [mark])
    assert_nothing_queued(server)


def test_untrusted_refused_without_recipients_has_no_transaction(serve: Any) -> None:
    server = serve(server=UNTRUSTED)
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        for rcpt in RELAY_ATTEMPTS:
            expect(cmd(s, f"RCPT TO:{rcpt}"), 554, "5.7.1")
        expect(cmd(s, "DATA"), 503, "5.5.1")
    assert files_under(server.config.local.mail_dir) == []
    assert_nothing_queued(server)


def test_untrusted_utf8_remote_domain_refused(serve: Any) -> None:
    server = serve(server=UNTRUSTED)
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test> SMTPUTF8"), 250, "2.1.0")
        for rcpt in ("<x@rémote.test>", "<x@ｅｘａｍｐｌｅ.test>", "<x@xn--rmote-bsa.test>",
                     "<ü%remote.test@example.test>"):
            expect(cmd(s, f"RCPT TO:{rcpt}"), 554, "5.7.1")
    assert_nothing_queued(server)


@pytest.mark.parametrize("sender", ["<alice@example.test>", "<>", "<postmaster@localhost>"])
@pytest.mark.parametrize("helo", ["mx.example.test", "localhost", "[127.0.0.1]"])
def test_sender_and_helo_grant_no_trust(serve: Any, sender: str, helo: str) -> None:
    server = serve(server=UNTRUSTED)
    with connect(server, helo=helo) as s:
        expect(cmd(s, f"MAIL FROM:{sender}"), 250, "2.1.0")
        expect(cmd(s, "RCPT TO:<x@remote.test>"), 554, "5.7.1")
        expect(cmd(s, "RCPT TO:<x%remote.test@example.test>"), 554, "5.7.1")
    assert_nothing_queued(server)


@pytest.mark.parametrize("rcpt", LOCAL_FORMS)
def test_untrusted_local_recipient_delivered(serve: Any, rcpt: str) -> None:
    server = serve(server=UNTRUSTED)
    mark = marker()
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        expect(cmd(s, f"RCPT TO:{rcpt}"), 250, "2.1.5")
        code, text = send_data(s, mark)
        assert code == 250 and text.startswith("2.0.0 OK delivered as"), (code, text)
    assert_only_alice_got(server, [mark])
    assert_nothing_queued(server)


def test_untrusted_one_transaction_many_disguises(serve: Any) -> None:
    """Every local spelling in one transaction, the relay attempts between them:
    one delivery to alice (one mailbox, written once), nothing queued."""
    server = serve(server=UNTRUSTED)
    mark = marker()
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        for i, relay in enumerate(RELAY_ATTEMPTS):
            expect(cmd(s, f"RCPT TO:{relay}"), 554, "5.7.1")
            expect(cmd(s, f"RCPT TO:{LOCAL_FORMS[i % len(LOCAL_FORMS)]}"), 250, "2.1.5")
        code, text = send_data(s, mark)
        assert code == 250 and text.startswith("2.0.0 OK delivered as"), (code, text)
    assert_only_alice_got(server, [mark])
    assert_nothing_queued(server)


# -- trusted client (default: 127.0.0.0/8) --------------------------------------------


@pytest.mark.parametrize("rcpt", SMUGGLING_FORMS)
def test_trusted_client_still_cannot_smuggle(serve: Any, rcpt: str) -> None:
    server = serve()
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        expect(cmd(s, f"RCPT TO:{rcpt}"), 554, "5.7.1")
        expect(cmd(s, "DATA"), 503, "5.5.1")
    assert files_under(server.config.local.mail_dir) == []
    assert_nothing_queued(server)


def test_trusted_client_may_relay_plain_remote(serve: Any) -> None:
    server = serve()
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        expect(cmd(s, "RCPT TO:<x@remote.test>"), 250, "2.1.5")
        expect(cmd(s, "RCPT TO:<x@Remote.Test>"), 250, "2.1.5")
        expect(cmd(s, "RSET"), 250, "2.0.0")
        # After RSET the recipient is gone.
        expect(cmd(s, "DATA"), 503, "5.5.1")
    assert files_under(server.config.local.mail_dir) == []
    assert_nothing_queued(server)


def test_trust_is_by_network(serve: Any) -> None:
    """A listed /32 holding the client is enough to trust it."""
    server = serve(server={"trusted_networks": ["192.0.2.0/24", "127.0.0.1/32"]})
    with connect(server) as s:
        expect(cmd(s, "MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        expect(cmd(s, "RCPT TO:<x@remote.test>"), 250, "2.1.5")
        expect(cmd(s, "RSET"), 250, "2.0.0")
    assert_nothing_queued(server)
