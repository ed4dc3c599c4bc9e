"""Remote delivery, retries and bounces, end to end.

The outside world is played by real servers on loopback: a DNS server (tests/peers.py)
that monomail's resolver is pointed at, and scripted SMTP peers on 127.0.0.2-5 on a
port that monomail's ``remote.port`` is pointed at. Time is injected for give-up and
delay warnings.
"""

from __future__ import annotations

import email
import json
import mailbox
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Clock, cli, relay, wait_until
from peers import SMTPPeer, self_signed_cert

BODY = b"Subject: relay me\r\nFrom: alice@example.test\r\n\r\nline one\r\n.dot line\r\n..two\r\nend\r\n"


def send(server, rcpts: list[str], sender: str = "alice@example.test", data: bytes = BODY) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        return s.data(data)


def spool_entries(server) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(server.config.server.spool_dir.glob("*.json"))]


def last_reply(entry: dict, n: int = 0) -> str:
    """A recipient's last reply as the spool record holds it (code, status, text)."""
    reply = entry["recipients"][n]["reply"]
    return f"{reply['code']} {reply['status']} {reply['text']}"


def alice_mail(server) -> list[email.message.Message]:
    path = server.config.local.mail_dir / "alice"
    if not all((path / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return []  # not created yet (or being created right now by the server)
    box = mailbox.Maildir(path, factory=None, create=False)
    return [email.message_from_bytes(box.get_bytes(k)) for k in sorted(box.keys())]


def report_blocks(dsn: email.message.Message) -> list[email.message.Message]:
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = dsn.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()


def flush(server) -> None:
    server.loop.call_soon_threadsafe(server.app.queue.flush)


# -- acceptance 1: MX delivery ---------------------------------------------------------


def test_relay_by_mx_keeps_body_and_adds_received(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port)
    server = relay(serve, dns, port)
    code, text = send(server, ["x@remote.test", "y@REMOTE.test"])
    assert code == 250 and b"delivered" in text  # cut-through: the peer said 250 before we did
    (got,) = peer.received
    assert got.mail_from == "alice@example.test"
    assert sorted(got.rcpt_tos) == ["x@remote.test", "y@remote.test"]  # one transaction for the domain
    head, body = got.data.split(b"\r\n\r\n", 1)
    assert body == b"line one\r\n.dot line\r\n..two\r\nend\r\n"
    assert head.startswith(b"Received: from ") and b"by mx.example.test (monomail)" in head
    assert b"Subject: relay me" in head
    assert spool_entries(server) == []
    # A second message reuses the cached connection and the cached DNS answers (TTL 300).
    assert send(server, ["x@remote.test"])[0] == 250
    assert len(peer.received) == 2 and peer.connections == 1
    assert dns.queries.count(("remote.test", "MX")) == 1


# -- acceptance 2: preference, fallback, null MX, NXDOMAIN, implicit MX ---------------


def test_mx_preference_and_fallback(serve, dns, port, peers):
    dns.mx("remote.test", (20, "mx2.remote.test"), (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")  # nothing listens there: connection refused
    dns.a("mx2.remote.test", "127.0.0.3")
    peer = peers("127.0.0.3", port)
    server = relay(serve, dns, port)
    assert send(server, ["x@remote.test"])[0] == 250
    assert len(peer.received) == 1
    assert dns.queries.index(("mx1.remote.test", "A")) >= 0


def test_next_mx_after_4xx_greeting_ehlo_and_hang(serve, dns, port, peers):
    dns.mx("remote.test", (10, "a.remote.test"), (20, "b.remote.test"), (30, "c.remote.test"), (40, "d.remote.test"))
    dns.a("a.remote.test", "127.0.0.2")
    dns.a("b.remote.test", "127.0.0.3")
    dns.a("c.remote.test", "127.0.0.6")
    dns.a("d.remote.test", "127.0.0.4")
    busy = peers("127.0.0.2", port, greeting_reply="421 4.3.2 busy")
    hung = peers("127.0.0.3", port, hang=True)
    no_ehlo = peers("127.0.0.6", port, ehlo_reply="450 4.0.0 not now")
    good = peers("127.0.0.4", port)
    server = relay(serve, dns, port, remote={"connect_timeout": "1s", "command_timeout": "1s"})
    assert send(server, ["x@remote.test"])[0] == 250
    assert busy.connections == 1 and hung.connections == 1 and no_ehlo.connections == 1
    assert no_ehlo.received == [] and len(good.received) == 1


def test_implicit_mx_from_a_record(serve, dns, port, peers):
    dns.a("plain.test", "127.0.0.2")  # no MX at all
    peer = peers("127.0.0.2", port)
    server = relay(serve, dns, port)
    assert send(server, ["x@plain.test"])[0] == 250
    assert peer.received[0].rcpt_tos == ["x@plain.test"]


@pytest.mark.parametrize(("setup", "status"), [("null_mx", b"5.1.10"), ("nxdomain", b"5.1.2")])
def test_null_mx_and_nxdomain_fail_at_once(serve, dns, port, setup, status):
    getattr(dns, setup)("gone.test")
    server = relay(serve, dns, port)
    code, text = send(server, ["x@gone.test"])
    assert code == 554 and text.startswith(status)  # every recipient failed: the client is told, no bounce
    assert spool_entries(server) == []
    assert alice_mail(server) == []


def test_servfail_defers(serve, dns, port):
    dns.servfail("flaky.test")
    server = relay(serve, dns, port)
    code, text = send(server, ["x@flaky.test"])
    assert code == 250 and b"queued" in text
    (entry,) = spool_entries(server)
    assert entry["recipients"][0]["state"] == "deferred"
    assert last_reply(entry).startswith("451 4.4.3")


# -- acceptance 3: mixed outcomes in one transaction ---------------------------------------


def test_mixed_outcomes_deliver_bounce_and_defer(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, rcpt_replies={"temp": "450 4.2.0 try later", "perm": "550 5.1.1 no such user"})
    server = relay(serve, dns, port, queue={"retry": ["1h"]})
    code, text = send(server, ["ok@remote.test", "perm@remote.test", "temp@remote.test"])
    assert code == 250 and b"queued" in text
    assert [r.rcpt_tos for r in peer.received] == [["ok@remote.test"]]
    # One bounce to the sender (alice is local), for perm@ only.
    wait_until(lambda: len(alice_mail(server)) == 1)
    (dsn,) = alice_mail(server)
    assert dsn["To"] == "alice@example.test" and dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Return-Path"] == "<>"  # sent from the null sender
    blocks = report_blocks(dsn)
    assert blocks[0]["Reporting-MTA"] == "dns; mx.example.test"
    (failed,) = blocks[1:]
    assert failed["Final-Recipient"] == "rfc822; perm@remote.test"
    assert (failed["Action"], failed["Status"]) == ("failed", "5.1.1")
    assert "550 5.1.1 no such user" in failed["Diagnostic-Code"]
    assert failed["Remote-MTA"] == "dns; mx1.remote.test"
    assert "Subject: relay me" in dsn.get_payload()[2].get_payload()
    # The deferred one is in the queue, with its error.
    out = cli("queue", "list", "-c", str(server.config.path))
    assert "deferred <temp@remote.test>" in out.stdout and "450 4.2.0 try later" in out.stdout
    assert "ok@remote.test" not in out.stdout


# -- acceptance 4: retry on schedule, give up, restart, flush --------------------------


def test_retry_on_schedule_then_give_up_with_bounce(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peers("127.0.0.2", port, rcpt_replies={"temp": "451 4.3.0 not now"})
    clock = Clock()
    server = relay(serve, dns, port, clock=clock, queue={"retry": ["1s"], "give_up_after": "5d", "warn_after": ""})
    assert send(server, ["temp@remote.test"])[0] == 250
    # The runner retries by itself on the 1s schedule.
    wait_until(lambda: spool_entries(server) and spool_entries(server)[0]["recipients"][0]["attempts"] >= 3)
    assert alice_mail(server) == []  # no warning (warn_after off), no bounce yet
    clock.offset = 5 * 86400 + 60  # five days later
    flush(server)
    wait_until(lambda: spool_entries(server) == [] and len(alice_mail(server)) == 1)
    (block,) = report_blocks(alice_mail(server)[0])[1:]
    assert block["Action"] == "failed" and block["Status"] == "4.3.0"
    assert "451 4.3.0 not now" in block["Diagnostic-Code"]


def test_deferred_mail_survives_restart_and_flush_delivers(process_server, dns, port):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    server = process_server(dns={"nameservers": [dns.address], "timeout": "2s"},
                            remote={"port": port, "connect_timeout": "1s"}, queue={"retry": ["1h"]})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:  # nobody listens at the MX yet
        assert s.sendmail("alice@example.test", ["x@remote.test"], BODY) == {}
    spool = server.config_path.parent / "spool"
    assert len(list(spool.glob("*.json"))) == 1
    assert server.terminate() == 0
    server.start()  # a restart: the entry is still there, its next attempt an hour away
    peer = SMTPPeer("127.0.0.2", port).start()  # the destination comes back
    try:
        time.sleep(0.5)
        assert peer.received == []
        out = cli("queue", "flush", "-c", str(server.config_path))
        assert out.returncode == 0 and "notified" in out.stdout, out.stdout + out.stderr
        peer.wait_for(1)
        wait_until(lambda: not list(spool.glob("*.json")))
        assert b"line one" in peer.received[0].data
    finally:
        peer.stop()
    assert server.terminate() == 0


def test_queue_hold_release_show_delete(process_server, dns, port):
    dns.servfail("flaky.test")
    server = process_server(dns={"nameservers": [dns.address], "timeout": "1s"}, remote={"port": port},
                            queue={"retry": ["1s"]})
    cfg = str(server.config_path)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("alice@example.test", ["x@flaky.test"], BODY) == {}
        assert s.sendmail("alice@example.test", ["y@flaky.test"], BODY) == {}
    spool = server.config_path.parent / "spool"
    first, second = sorted(p.stem for p in spool.glob("*.json"))
    assert "held" in cli("queue", "hold", first, "-c", cfg).stdout
    attempts = json.loads((spool / f"{first}.json").read_text())["recipients"][0]["attempts"]
    time.sleep(2.5)  # retries every second, but not for the held entry
    record = json.loads((spool / f"{first}.json").read_text())
    assert record["hold"] is True and record["recipients"][0]["attempts"] == attempts
    assert json.loads((spool / f"{second}.json").read_text())["recipients"][0]["attempts"] > 1
    show = cli("queue", "show", first, "-c", cfg).stdout
    assert "held:        yes" in show and "<x@flaky.test> deferred" in show and "Subject: relay me" in show
    assert "(held)" in cli("queue", "list", "-c", cfg).stdout
    assert "released" in cli("queue", "release", first, "-c", cfg).stdout
    wait_until(lambda: json.loads((spool / f"{first}.json").read_text())["recipients"][0]["attempts"] > attempts)
    assert "deleted" in cli("queue", "delete", second, "-c", cfg).stdout
    assert not (spool / f"{second}.json").exists() and not (spool / f"{second}.msg").exists()
    bad = cli("queue", "show", "nosuchid", "-c", cfg)
    assert bad.returncode == 1 and "no queue entry" in bad.stderr and "Traceback" not in bad.stderr
    assert server.terminate() == 0


# -- acceptance 5: TLS -----------------------------------------------------------------


def test_starttls_is_used_when_offered(serve, dns, port, peers, tmp_path):
    cert = self_signed_cert(tmp_path)
    if cert is None:
        pytest.skip("no way to make a certificate here")
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, tls_cert=cert)
    server = relay(serve, dns, port)
    assert send(server, ["x@remote.test"])[0] == 250
    assert peer.received[0].tls is True


def test_tls_required_defers_rather_than_send_in_the_clear(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port)  # offers no STARTTLS
    server = relay(serve, dns, port, remote={"tls": "required"})
    code, text = send(server, ["x@remote.test"])
    assert code == 250 and b"queued" in text
    assert peer.received == []
    (entry,) = spool_entries(server)
    assert last_reply(entry).startswith("451 4.7.5")


# -- acceptance 6: smarthost with AUTH ------------------------------------------------------


def test_smarthost_with_auth(serve, dns, port, peers, tmp_path):
    cert = self_signed_cert(tmp_path)
    if cert is None:
        pytest.skip("no way to make a certificate here")
    relayhost = peers("127.0.0.4", port, tls_cert=cert, require_auth=("relayuser", "s3cret"))
    server = relay(serve, dns, port, remote={"smarthost": f"127.0.0.4:{port}", "smarthost_username": "relayuser",
                                             "smarthost_password": "s3cret"})
    assert send(server, ["x@anywhere.test", "y@elsewhere.test"])[0] == 250
    got = [(r.auth_user, r.tls, r.rcpt_tos) for r in relayhost.received]
    assert sorted(got) == [("relayuser", True, ["x@anywhere.test"]), ("relayuser", True, ["y@elsewhere.test"])]
    assert dns.queries == []  # no MX lookups with a smarthost


def test_smarthost_wrong_password_defers(serve, dns, port, peers, tmp_path):
    cert = self_signed_cert(tmp_path)
    if cert is None:
        pytest.skip("no way to make a certificate here")
    relayhost = peers("127.0.0.4", port, tls_cert=cert, require_auth=("relayuser", "s3cret"))
    server = relay(serve, dns, port, remote={"smarthost": f"127.0.0.4:{port}", "smarthost_username": "relayuser",
                                             "smarthost_password": "wrong"})
    code, text = send(server, ["x@anywhere.test"])
    assert code == 250 and b"queued" in text
    assert relayhost.received == []
    assert last_reply(spool_entries(server)[0]).startswith("451 4.7.0")


# -- acceptance 7: never bounce a bounce; one delay warning --------------------------------


def test_bounce_of_a_bounce_never_happens(serve, dns, port, peers, caplog):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, rcpt_replies={"perm": "550 5.1.1 no such user"})
    server = relay(serve, dns, port)
    code, _ = send(server, ["ok@remote.test", "perm@remote.test"], sender="")
    assert code == 250
    assert [r.rcpt_tos for r in peer.received] == [["ok@remote.test"]]
    assert spool_entries(server) == []  # nothing journalled: no DSN to <>
    assert "never bounce a bounce" in caplog.text


def test_delay_warning_is_sent_once(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peers("127.0.0.2", port, rcpt_replies={"temp": "450 4.2.0 try later"})
    clock = Clock()
    server = relay(serve, dns, port, clock=clock, queue={"retry": ["1h"], "warn_after": "4h", "give_up_after": "5d"})
    assert send(server, ["temp@remote.test"])[0] == 250
    clock.offset = 5 * 3600
    flush(server)
    wait_until(lambda: len(alice_mail(server)) == 1)
    dsn = alice_mail(server)[0]
    assert dsn["Subject"].startswith("Delayed Mail")
    (block,) = report_blocks(dsn)[1:]
    assert (block["Action"], block["Status"]) == ("delayed", "4.2.0") and block["Will-Retry-Until"]
    clock.offset = 7 * 3600
    flush(server)
    wait_until(lambda: spool_entries(server)[0]["recipients"][0]["attempts"] >= 3)
    time.sleep(0.3)
    assert len(alice_mail(server)) == 1  # still one warning
    assert spool_entries(server)[0]["warned"] is True


# -- capabilities of the peer --------------------------------------------------------------


def test_smtputf8_needed_but_not_offered_fails_permanently(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, smtputf8=False)
    server = relay(serve, dns, port)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.mail("j\u00f6rg@example.test", ["SMTPUTF8"])[0] == 250
        assert s.rcpt("x@remote.test")[0] == 250
        code, text = s.data(BODY)
    assert code == 554 and text.startswith(b"5.6.7")
    assert peer.received == []


def test_message_over_peer_size_fails(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peers("127.0.0.2", port, size=100)
    server = relay(serve, dns, port)
    code, text = send(server, ["x@remote.test"])
    assert code == 552 and text.startswith(b"5.3.4")


def test_ipv6_mx_host(serve, dns, port, peers):
    dns.mx("six.test", (10, "mx.six.test"))
    dns.aaaa("mx.six.test", "::1")
    peer = peers("::1", port)
    server = relay(serve, dns, port)
    assert send(server, ["x@six.test"])[0] == 250
    assert peer.received[0].rcpt_tos == ["x@six.test"]


# -- a third-party MTA: Postfix's smtp-sink ---------------------------------------------------


@pytest.mark.skipif(shutil.which("smtp-sink") is None and not Path("/usr/sbin/smtp-sink").exists(),
                    reason="Postfix's smtp-sink is not installed")
def test_delivery_into_postfix_smtp_sink(serve, dns, port):
    # smtp-sink drops privileges (-u nobody): its dump folder must be reachable for nobody.
    dump = Path(tempfile.mkdtemp(prefix="monomail-smtp-sink-"))
    dump.chmod(0o777)
    sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    sink = subprocess.Popen([sink_bin, "-u", "nobody", "-h", "sink.test", "-d", f"{dump}/", f"127.0.0.5:{port}", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                smtplib.SMTP("127.0.0.5", port, timeout=1).quit()
                break
            except OSError:
                time.sleep(0.05)
        dns.mx("postfix.test", (10, "mx.postfix.test"))
        dns.a("mx.postfix.test", "127.0.0.5")
        server = relay(serve, dns, port)
        code, text = send(server, ["x@postfix.test"])
        assert code == 250, text
        wait_until(lambda: any(p.stat().st_size for p in dump.iterdir()))
        (dumped,) = [p.read_bytes() for p in dump.iterdir() if p.stat().st_size]
        assert b"X-Rcpt-Args: <x@postfix.test>" in dumped
        assert b"by mx.example.test (monomail)" in dumped and b"line one" in dumped
    finally:
        sink.kill()
        sink.wait(5)
        shutil.rmtree(dump, ignore_errors=True)


def test_retry_of_a_recipient_half_delivered_sends_only_the_rest(serve, dns, port, peers):
    """An alias to a local user and a remote address: the local copy is written, the remote
    one deferred. The retry skips the copy already written and sends the rest. (The retry
    used to crash on the skipped destination, a KeyError taken for a temporary failure of
    everyone, so the remote copy was never sent and the alias finally bounced.)"""
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, rcpt_replies={"temp": "451 4.3.0 not now"})
    server = relay(serve, dns, port, aliases={"both": ["alice", "temp@remote.test"]}, queue={"retry": ["2s"]})
    assert send(server, ["both@example.test"])[0] == 250
    (entry,) = spool_entries(server)  # journalled before the 250
    assert entry["recipients"][0]["finished"] == [f"mailbox:{server.config.local.mail_dir / 'alice'}"]
    assert len(alice_mail(server)) == 1
    peer.rcpt_replies.clear()  # the remote takes it now; the runner retries in 2s
    peer.wait_for(1)
    wait_until(lambda: not list(server.config.server.spool_dir.glob("*.json")))  # (names only: no read race)
    assert [r.rcpt_tos for r in peer.received] == [["temp@remote.test"]]
    assert len(alice_mail(server)) == 1  # not written twice
