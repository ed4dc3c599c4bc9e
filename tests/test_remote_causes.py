"""Remote delivery says why: HELO fallback, and the real cause of every deferral and failure.

Issue 8, defects 10 and 11. The outside world is real servers on loopback (tests/peers.py):
a DNS server monomail's resolver is pointed at, and scripted SMTP peers on 127.0.0.x on
the port that ``remote.port`` is pointed at; 127.0.0.3 has nobody listening (connection
refused). What the admin and the sender see is read back where they see it: the SMTP
reply, ``monomail queue list``, the mail log line with the queue id, and the bounce.
"""

from __future__ import annotations

import email
import mailbox
import re
import smtplib
from typing import Any

import conftest
import pytest
from conftest import Clock, cli, wait_until
from peers import DNSServer

BODY = b"Subject: why\r\nFrom: alice@example.test\r\n\r\nline one\r\n.dot line\r\nend\r\n"


def relay(serve, dns: DNSServer, port: int, clock: Any = None, **overrides: Any):
    """`conftest.relay` with a 1 s connect timeout and retries an hour apart by default."""
    remote = {"connect_timeout": "1s", **overrides.pop("remote", {})}
    queue = {"retry": ["1h"], **overrides.pop("queue", {})}
    return conftest.relay(serve, dns, port, clock, remote=remote, queue=queue, **overrides)


def send(server, rcpts: list[str], data: bytes = BODY, options: tuple[str, ...] = ()) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.mail("alice@example.test", list(options))[0] == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        return s.data(data)


def queue_list(server) -> str:
    out = cli("queue", "list", "-c", str(server.config.path))
    assert out.returncode == 0, out.stderr
    return out.stdout


def outcome_line(caplog, rcpt: str) -> str:
    """The mail log's line for ``rcpt``'s last attempt: ``<qid>: to=<rcpt> status=...``."""
    lines = [r.getMessage() for r in caplog.records if r.name == "monomail.mail"]
    mine = [line for line in lines if re.match(rf"\w+: to=<{re.escape(rcpt)}> status=", line)]
    assert mine, lines
    return mine[-1]


def alice_mail(server) -> list[email.message.Message]:
    path = server.config.local.mail_dir / "alice"
    if not all((path / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return []
    box = mailbox.Maildir(path, factory=None, create=False)
    return [email.message_from_bytes(box.get_bytes(k)) for k in sorted(box.keys())]


def flush(server) -> None:
    server.loop.call_soon_threadsafe(server.app.queue.flush)


# -- defect 10: a peer that refuses EHLO is greeted with HELO --------------------------------


@pytest.mark.parametrize("refusal", ["502 5.5.1 Command not recognized", "500 Syntax error, command unrecognized",
                                     "550 5.7.1 no ESMTP here"])
def test_peer_refusing_ehlo_gets_the_message_over_helo(serve, dns, port, peers, refusal):
    dns.mx("old.test", (10, "mx.old.test"))
    dns.a("mx.old.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, reject_ehlo=refusal)
    server = relay(serve, dns, port)
    code, text = send(server, ["x@old.test", "y@old.test"])
    assert code == 250 and b"delivered" in text, text  # delivered, not bounced
    (got,) = peer.received
    assert got.esmtp is False  # greeted with HELO
    assert got.mail_options == []  # no ESMTP parameters over HELO
    assert sorted(got.rcpt_tos) == ["x@old.test", "y@old.test"]
    assert got.data.endswith(b"\r\n\r\nline one\r\n.dot line\r\nend\r\n")
    assert peer.connections == 1


def test_over_helo_there_is_no_8bitmime_and_no_smtputf8(serve, dns, port, peers):
    dns.mx("old.test", (10, "mx.old.test"))
    dns.a("mx.old.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, reject_ehlo="502 5.5.1 Command not recognized")
    server = relay(serve, dns, port)
    eight_bit = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    code, text = send(server, ["x@old.test"], data=eight_bit, options=("BODY=8BITMIME",))
    assert code == 554 and text.startswith(b"5.6.3"), text  # no MIME downgrade: a clear refusal
    code, text = send(server, ["x@old.test"], options=("SMTPUTF8",))
    assert code == 554 and text.startswith(b"5.6.7"), text
    assert peer.received == []


def test_helo_only_peer_with_tls_required_defers_and_says_why(serve, dns, port, peers, caplog):
    dns.mx("old.test", (10, "mx.old.test"))
    dns.a("mx.old.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, reject_ehlo="502 5.5.1 Command not recognized")
    server = relay(serve, dns, port, remote={"tls": "required"})
    code, text = send(server, ["x@old.test"])
    assert code == 250 and b"queued" in text
    assert peer.received == []
    line = outcome_line(caplog, "x@old.test")
    assert "status=deferred" in line and f"451 4.7.5 mx.old.test[127.0.0.2]:{port}: TLS required" in line


def test_ehlo_and_helo_both_refused_fails_that_host_only(serve, dns, port, peers):
    dns.mx("two.test", (10, "a.two.test"), (20, "b.two.test"))
    dns.a("a.two.test", "127.0.0.2")
    dns.a("b.two.test", "127.0.0.4")
    dns.mx("one.test", (10, "a.two.test"))
    rude = peers("127.0.0.2", port, ehlo_reply="554 5.7.1 go away")  # to EHLO and to HELO
    good = peers("127.0.0.4", port)
    server = relay(serve, dns, port)
    assert send(server, ["x@two.test"])[0] == 250
    assert rude.received == [] and len(good.received) == 1
    code, text = send(server, ["x@one.test"])  # the only host refuses both: its own 5xx, naming it
    assert code == 554
    assert text == f"5.7.1 a.two.test[127.0.0.2]:{port} said: go away (in reply to HELO)".encode()


# -- defect 11: every deferral and failure carries its real cause and host -------------------


def test_refused_connection_names_host_port_and_refused(serve, dns, port, caplog):
    dns.mx("down.test", (10, "mx.down.test"))
    dns.a("mx.down.test", "127.0.0.3")  # nobody listens there
    server = relay(serve, dns, port)
    code, text = send(server, ["x@down.test"])
    assert code == 250 and b"queued" in text
    cause = f"451 4.4.1 connect to mx.down.test[127.0.0.3]:{port}: connection refused"
    listed = queue_list(server)
    assert cause in listed and "will retry" not in listed
    line = outcome_line(caplog, "x@down.test")  # the log line with the queue id
    assert "status=deferred" in line and cause in line and "will retry" not in line


def test_timeout_names_host_and_what_it_waited_for(serve, dns, port, peers, caplog):
    dns.mx("slow.test", (10, "mx.slow.test"))
    dns.a("mx.slow.test", "127.0.0.2")
    peers("127.0.0.2", port, hang=True)  # accepts, never greets
    server = relay(serve, dns, port)
    assert send(server, ["x@slow.test"])[0] == 250
    cause = f"451 4.4.2 mx.slow.test[127.0.0.2]:{port}: timeout after 1s waiting for the greeting"
    assert cause in queue_list(server)
    assert cause in outcome_line(caplog, "x@slow.test")


def test_connection_lost_names_the_command(serve, dns, port, peers, caplog):
    dns.mx("drop.test", (10, "mx.drop.test"))
    dns.a("mx.drop.test", "127.0.0.2")
    peers("127.0.0.2", port, drop_after_rcpt=True)
    server = relay(serve, dns, port)
    assert send(server, ["x@drop.test"])[0] == 250
    cause = f"451 4.4.2 mx.drop.test[127.0.0.2]:{port}: connection lost during RCPT TO"
    assert cause in queue_list(server)
    assert cause in outcome_line(caplog, "x@drop.test")


def test_remote_4xx_keeps_its_text_and_says_which_host(serve, dns, port, peers, caplog):
    dns.mx("busy.test", (10, "mx.busy.test"))
    dns.a("mx.busy.test", "127.0.0.2")
    dns.mx("grey.test", (10, "mx.grey.test"))
    dns.a("mx.grey.test", "127.0.0.4")
    peers("127.0.0.2", port, greeting_reply="421 4.3.2 too busy today, come back later")
    peers("127.0.0.4", port, rcpt_replies={"x": "450 4.2.0 greylisted, try again in 5 minutes"})
    server = relay(serve, dns, port)
    assert send(server, ["x@busy.test"])[0] == 250
    assert send(server, ["x@grey.test"])[0] == 250
    greeting = f"421 4.3.2 mx.busy.test[127.0.0.2]:{port} said: too busy today, come back later (greeting)"
    listed = queue_list(server)
    assert greeting in listed
    assert greeting in outcome_line(caplog, "x@busy.test")
    # A recipient's refusal is the peer's own words (as the DSN's Diagnostic-Code wants);
    # the log line with the queue id also says which host, in reply to what.
    assert "450 4.2.0 greylisted, try again in 5 minutes" in listed
    line = outcome_line(caplog, "x@grey.test")
    assert f"mx.grey.test[127.0.0.4]:{port} said: 450 4.2.0 greylisted, try again in 5 minutes" \
           " (in reply to RCPT TO)" in line


def test_several_hosts_tried_the_last_is_told_and_each_is_logged(serve, dns, port, caplog):
    dns.mx("dark.test", (10, "a.dark.test"), (20, "b.dark.test"))
    dns.a("a.dark.test", "127.0.0.3")
    dns.a("b.dark.test", "127.0.0.5")  # nobody listens on either
    server = relay(serve, dns, port)
    assert send(server, ["x@dark.test"])[0] == 250
    told = (f"451 4.4.1 connect to b.dark.test[127.0.0.5]:{port}: connection refused"
            " (the last of 2 hosts tried)")
    assert told in queue_list(server)
    line = outcome_line(caplog, "x@dark.test")
    assert told in line and f"a.dark.test[127.0.0.3]:{port}: connection refused" in line


def test_dns_failure_says_what_failed(serve, dns, port, caplog):
    dns.servfail("flaky.test")
    server = relay(serve, dns, port)
    assert send(server, ["x@flaky.test"])[0] == 250
    listed = queue_list(server)
    assert "451 4.4.3 DNS lookup of flaky.test MX failed:" in listed and "SERVFAIL" in listed
    assert "will retry" not in listed
    assert "SERVFAIL" in outcome_line(caplog, "x@flaky.test")


def test_give_up_bounce_holds_the_real_cause(serve, dns, port):
    dns.mx("down.test", (10, "mx.down.test"))
    dns.a("mx.down.test", "127.0.0.3")  # refused, every time
    clock = Clock()
    server = relay(serve, dns, port, clock=clock, queue={"give_up_after": "2h", "warn_after": ""})
    assert send(server, ["x@down.test"])[0] == 250
    clock.offset = 3 * 3600
    flush(server)
    wait_until(lambda: len(alice_mail(server)) == 1)
    (dsn,) = alice_mail(server)
    text, status = dsn.get_payload()[0], dsn.get_payload()[1]
    (block,) = status.get_payload()[1:]
    assert block["Action"] == "failed" and block["Status"] == "4.4.1"
    cause = f"451 4.4.1 connect to mx.down.test[127.0.0.3]:{port}: connection refused"
    assert cause in " ".join(block["Diagnostic-Code"].split())
    assert cause in " ".join(text.get_payload(decode=True).decode().split())
    assert "will retry" not in dsn.as_string().lower()


def test_mx_host_without_address_is_named(serve, dns, port):
    dns.mx("empty.test", (10, "mx.empty.test"))
    dns.nxdomain("mx.empty.test")
    server = relay(serve, dns, port)
    code, text = send(server, ["x@empty.test"])
    assert code == 554  # every recipient failed: the client is told at once
    assert text == b"5.1.2 Domain empty.test has no mail host with an address (mx.empty.test)"
