"""Issue 12, acceptance 3: the Prometheus endpoint, scraped over HTTP and parsed with
prometheus_client's own text parser; its counters move by exactly what a test sends."""

from __future__ import annotations

import smtplib
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import free_port, relay, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_submission import client_context, connect, login_plain, submit_server  # noqa: F401  (a fixture)

from monomail.envelope import Outcome, Status
from monomail.errors import Reply
from monomail.metrics import Metrics, reply_codes, transport_of

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def metrics_port(server: Any) -> int:
    assert server.app.metrics_listener is not None
    return server.app.metrics_listener.port


def send(server: Any, rcpt: str) -> int:
    """One message on one connection (220 EHLO MAIL RCPT DATA ... QUIT); the DATA reply code."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=15) as s:
        try:
            s.sendmail("alice@example.test", [rcpt], f"From: alice@example.test\r\nTo: {rcpt}\r\n\r\nhi\r\n")
        except smtplib.SMTPDataError as exc:  # smtplib says RSET after a refused DATA
            return exc.smtp_code
        return 250


def test_counters_move_by_exactly_what_was_sent(serve, dns, port, peers):
    dns.mx("remote.test", (10, "mx1.remote.test"))
    dns.a("mx1.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port, rcpt_replies={"temp": "451 4.3.0 not now", "perm": "550 5.1.1 no such user"})
    server = relay(serve, dns, port, queue={"retry": ["1h"]}, metrics={"listen": f"127.0.0.1:{free_port()}"})
    mport = metrics_port(server)
    before = scrape(mport)
    assert value(before, "monomail_queue_messages") == 0
    assert value(before, "monomail_smtp_sessions") == 0

    assert send(server, "alice@example.test") == 250  # delivered (maildir)
    assert send(server, "temp@remote.test") == 250  # deferred (remote 451), queued, retried in an hour
    assert send(server, "perm@remote.test") == 554  # bounced (remote 550): the client hears it itself
    assert peer.received == []
    wait_until(lambda: value(scrape(mport), "monomail_smtp_sessions") == 0)
    after = scrape(mport)

    assert delta(before, after, "monomail_messages_received_total") == 3
    moved = {(dict(labels)["transport"], dict(labels)["status"]): after[(name, labels)] - before.get((name, labels), 0)
             for name, labels in after if name == "monomail_deliveries_total"}
    assert {k: v for k, v in moved.items() if v} == {
        ("maildir", "delivered"): 1, ("smtp", "deferred"): 1, ("smtp", "bounced"): 1}
    for transport in ("maildir", "mbox", "lmtp", "smtp", "pipe"):  # every label is there from the start
        for status in ("delivered", "deferred", "bounced"):
            assert ("monomail_deliveries_total", frozenset({"transport": transport, "status": status}.items())) \
                in before
    assert value(after, "monomail_queue_messages") == 1
    assert delta(before, after, "monomail_delivery_seconds_count") == 3
    assert delta(before, after, "monomail_delivery_seconds_sum") > 0
    # Each session: 220, EHLO 250, MAIL 250, RCPT 250, DATA 354, the DATA reply, QUIT 221
    # (and RSET 250 after the refused one).
    assert delta(before, after, "monomail_smtp_replies_total", code_class="2xx") == 6 + 6 + 6
    assert delta(before, after, "monomail_smtp_replies_total", code_class="3xx") == 3
    assert delta(before, after, "monomail_smtp_replies_total", code_class="4xx") == 0
    assert delta(before, after, "monomail_smtp_replies_total", code_class="5xx") == 1
    assert delta(before, after, "monomail_tls_sessions_total") == 0
    assert delta(before, after, "monomail_auth_failures_total") == 0


def test_sessions_gauge_counts_open_sessions(serve):
    server = serve(metrics={"listen": f"127.0.0.1:{free_port()}"})
    mport = metrics_port(server)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as one, \
            smtplib.SMTP("127.0.0.1", server.port, timeout=10) as two:
        one.ehlo()
        two.ehlo()
        assert value(scrape(mport), "monomail_smtp_sessions") == 2
    wait_until(lambda: value(scrape(mport), "monomail_smtp_sessions") == 0)


def test_tls_sessions_and_auth_failures(submit_server):  # noqa: F811  (the fixture imported above)
    server = submit_server(metrics={"listen": f"127.0.0.1:{free_port()}"})
    mport = metrics_port(server)
    before = scrape(mport)
    with connect(server) as s:
        s.starttls(context=client_context())
        s.ehlo()
        assert login_plain(s, password="wrong")[0] == 535
        assert login_plain(s, password="also wrong")[0] == 535
        assert login_plain(s)[0] == 235
    after = scrape(mport)
    assert delta(before, after, "monomail_tls_sessions_total") == 1
    assert delta(before, after, "monomail_auth_failures_total") == 2


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_answers_only_get_metrics(serve):
    server = serve(metrics={"listen": f"127.0.0.1:{free_port()}"})
    mport = metrics_port(server)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=10)
    assert err.value.code == 404
    assert raw_request(mport, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw_request(mport, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    too_long = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert raw_request(mport, too_long).startswith(b"HTTP/1.1 400 ")
    assert raw_request(mport, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    # A client that says nothing does not hold up the others, and SMTP goes on meanwhile.
    with socket.create_connection(("127.0.0.1", mport), timeout=10):
        assert "monomail_smtp_sessions" in {name for name, _ in scrape(mport)}
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
            assert s.noop()[0] == 250


def test_off_by_default_and_one_registry_per_server(serve):
    plain = serve()
    assert plain.app.metrics_listener is None
    Metrics(), Metrics()  # the default registry would refuse the second (duplicated timeseries)


def test_transport_from_the_outcome_detail():
    def o(detail: str) -> Outcome:
        return Outcome("a@b", Status.DELIVERED, Reply(250, "2.0.0", "ok"), detail)

    assert transport_of(o("maildir /var/mail/alice")) == "maildir"
    assert transport_of(o("mbox /var/mail/bob via recipes x")) == "mbox"
    assert transport_of(o("remote remote.test: 550 5.1.1 no")) == "smtp"
    assert transport_of(o("lmtp unix:/run/dovecot/lmtp: 250")) == "lmtp"
    assert transport_of(o("the LMTP store: 452 4.2.2 quota")) == "lmtp"
    assert transport_of(o("no such user")) == "none"


def test_reply_codes_count_whole_replies():
    assert reply_codes(b"250-mx.example.test\r\n250-SIZE 10\r\n250 HELP") == [b"250"]
    assert reply_codes("220 ready") == [b"220"]
    assert reply_codes(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go on") == [b"250", b"250", b"354"]
    assert reply_codes(b"334 VXNlcm5hbWU6") == [b"334"]
