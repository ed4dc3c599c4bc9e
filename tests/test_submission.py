"""Issue 9: STARTTLS on every port, submission (587 STARTTLS, 465 implicit TLS) with AUTH,
sender ownership, and what submitted mail gets. Real servers on loopback, real clients
(smtplib, raw sockets with ssl), mail read back with the stdlib ``mailbox`` module."""

from __future__ import annotations

import base64
import mailbox
import re
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, relay, wait_until, write_config
from peers import self_signed_cert

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery"
UNTRUSTED = "127.0.0.5"  # trusted_networks below holds only 127.0.0.1


def client_context(**kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for key, value in kw.items():
        setattr(ctx, key, value)
    return ctx


def tls_files(tmp_path: Path) -> dict[str, Any]:
    made = self_signed_cert(tmp_path / "tls")
    if made is None:
        pytest.skip("cannot make a certificate (no openssl, no cryptography)")
    cert, key = made
    return {"cert": cert, "key": key}


def set_password(tmp_path: Path, user: str, password: str) -> None:
    """``monomail passwd USER`` with the password on standard input, as an admin runs it."""
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "monomail", "passwd", user, "-c", str(tmp_path / "monomail.toml")],
                          input=password, capture_output=True, text=True,
                          timeout=30, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def submission_overrides(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    server = {"trusted_networks": ["127.0.0.1/32"], **extra.pop("server", {})}
    users = extra.pop("users", {"alice": {"senders": ["@shop.test", "boss@remote.test"]},
                                "bob": {"mailbox_format": "mbox"}, "carol": {}})
    return {
        "tls": tls_files(tmp_path),
        "submission": {"listen": ["127.0.0.1:0"], "listen_tls": ["127.0.0.1:0"]},
        "server": server,
        "users": users,
        "aliases": {"postmaster": ["alice"], "al": ["alice"], "team": ["alice", "bob"]},
        **extra,
    }


@pytest.fixture
def submit_server(serve, tmp_path):
    """A server with TLS, 587 and 465, and alice's password set by `monomail passwd`."""

    def start(**extra: Any) -> Any:
        overrides = submission_overrides(tmp_path, **extra)
        write_config(tmp_path, **overrides)
        set_password(tmp_path, "alice", PASSWORD)
        return serve(**overrides)

    return start


def sub_port(server: Any, kind: str = "submission") -> int:
    return server.app.server.port(kind)


def connect(server: Any, kind: str = "submission", source: str = UNTRUSTED) -> smtplib.SMTP:
    port = sub_port(server, kind)
    if kind == "submissions":
        return smtplib.SMTP_SSL("127.0.0.1", port, source_address=(source, 0), context=client_context(), timeout=10)
    return smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10)


def login_plain(smtp: smtplib.SMTP, user: str = "alice", password: str = PASSWORD) -> tuple[int, bytes]:
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return smtp.docmd("AUTH", f"PLAIN {blob}")


def maildir(server: Any, user: str = "alice") -> list[Any]:
    return list(mailbox.Maildir(server.config.local.mail_dir / user, create=False))


def message(subject: str = "hi", sender: str = "alice@example.test", extra: str = "") -> str:
    return f"From: {sender}\r\nTo: someone\r\nSubject: {subject}\r\n{extra}\r\nbody\r\n"


# -- acceptance 1: STARTTLS on the MX port -----------------------------------------------


def test_mx_port_offers_starttls_not_auth_and_delivers_over_tls(serve, tmp_path):
    server = serve(tls=tls_files(tmp_path))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        assert smtp.starttls(context=client_context())[0] == 220
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls") and not smtp.has_extn("auth")  # port 25 never offers AUTH
        assert smtp.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 503
        assert smtp.docmd("STARTTLS")[0] == 503  # already active
        smtp.sendmail("someone@remote.test", ["alice@example.test"], message(sender="someone@remote.test"))
    wait_until(lambda: len(maildir(server)) == 1)
    received = maildir(server)[0]["Received"]
    assert "with ESMTPS id" in received
    assert "(using TLSv1.3 with cipher TLS_" in received


def test_tls_below_1_2_is_refused(serve, tmp_path):
    server = serve(tls=tls_files(tmp_path))
    ctx = client_context(minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")  # the client would offer it: the server must say no
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.ehlo("old.test")
        with pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)):
            smtp.starttls(context=ctx)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:  # the server is fine
        smtp.ehlo("new.test")
        assert smtp.starttls(context=client_context(minimum_version=ssl.TLSVersion.TLSv1_2))[0] == 220
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_plain_text_pipelined_behind_starttls_is_discarded(serve, tmp_path):
    server = serve(tls=tls_files(tmp_path))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO x.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")  # one segment: CVE-2011-0411 style
        assert f.readline().startswith(b"220 ")
        tls = client_context().wrap_socket(raw, server_hostname=None)
        tf = tls.makefile("rb")
        tls.sendall(b"NOOP\r\n")
        assert tf.readline().startswith(b"250 2.0.0")  # not a reply to the injected MAIL
        tls.sendall(b"EHLO x.test\r\n")
        while not tf.readline().startswith(b"250 "):
            pass
        tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
        assert tf.readline().startswith(b"503 5.5.1")  # no MAIL was taken
        tls.close()


# -- acceptance 2: submission on 587 and 465 --------------------------------------------


@pytest.mark.parametrize("kind", ["submission", "submissions"])
def test_submission_requires_auth_over_tls_and_then_relays(submit_server, dns, port, peers, kind):
    dns.mx("remote.test", (10, "mx.remote.test"))
    dns.a("mx.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port)
    server = submit_server(dns={"nameservers": [dns.address], "timeout": "2s"}, remote={"port": port})
    with connect(server, kind) as smtp:
        smtp.ehlo("laptop.test")
        if kind == "submission":
            assert smtp.has_extn("starttls") and not smtp.has_extn("auth")  # AUTH only over TLS
            assert smtp.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 538
            assert smtp.docmd("MAIL", "FROM:<alice@example.test>")[:1] == (530,)
            smtp.starttls(context=client_context())
            smtp.ehlo("laptop.test")
        assert smtp.has_extn("auth") and "PLAIN" in smtp.esmtp_features["auth"]
        assert "LOGIN" in smtp.esmtp_features["auth"] and not smtp.has_extn("starttls")
        code, text = smtp.docmd("MAIL", "FROM:<alice@example.test>")
        assert (code, text[:5]) == (530, b"5.7.0")
        assert login_plain(smtp)[0] == 235
        assert smtp.docmd("AUTH", "PLAIN x")[0] == 503  # already authenticated
        smtp.sendmail("alice@example.test", ["friend@remote.test"], message())
    wait_until(lambda: len(peer.received) == 1)
    assert peer.received[0].rcpt_tos == ["friend@remote.test"]


def test_auth_login_and_wrong_passwords_then_the_sixth_failure_is_421(submit_server, tmp_path):
    server = submit_server()
    log = logging_lines(server)
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        smtp.user, smtp.password = "alice", PASSWORD
        assert smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)[0] == 235
    for attempt in range(5):
        with connect(server, "submissions") as smtp:
            smtp.ehlo("laptop.test")
            who = "alice" if attempt % 2 else "nosuchuser"
            code, text = login_plain(smtp, who, "wrong")
            assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")  # the same either way
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        code, text = login_plain(smtp)  # even the right password: this client is blocked
        assert code == 421 and text.startswith(b"4.7.0")
    with connect(server, "submissions", source="127.0.0.6") as smtp:  # another client is not
        smtp.ehlo("laptop.test")
        assert login_plain(smtp)[0] == 235
    failures = [line for line in log() if "auth failed" in line]
    assert len(failures) == 5
    assert all(f"client=[{UNTRUSTED}]" in line for line in failures)
    assert any(re.search(r"user=nosuchuser session=\w+ mechanism=PLAIN$", line) for line in failures)  # (issue 12)


def logging_lines(server: Any) -> Any:
    """The server's log records (from this point on) as formatted lines."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.name}: {record.getMessage()}")

    handler = Keep()
    logging.getLogger("monomail").addHandler(handler)
    logging.getLogger("monomail").setLevel(logging.INFO)
    return lambda: list(lines)


# -- acceptance 3: sender ownership -----------------------------------------------------


def test_an_authenticated_user_sends_only_as_her_own_addresses(submit_server, dns, port, peers):
    dns.mx("remote.test", (10, "mx.remote.test"))
    dns.a("mx.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port)
    server = submit_server(dns={"nameservers": [dns.address], "timeout": "2s"}, remote={"port": port})
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        assert login_plain(smtp)[0] == 235
        for sender in ("alice@example.test", "alice@localhost", "al@example.test", "alice+lists@example.test",
                       "sales@shop.test", "boss@remote.test", ""):
            assert smtp.docmd("MAIL", f"FROM:<{sender}>")[0] == 250, sender
            smtp.rset()
        for sender in ("bob@example.test", "team@example.test", "postmaster@remote.test", "alice@remote.test"):
            code, text = smtp.docmd("MAIL", f"FROM:<{sender}>")
            assert (code, text[:5]) == (553, b"5.7.1"), sender
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("alice@example.test", ["friend@remote.test"], message(sender="Bob <bob@example.test>"))
        assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1")
        smtp.rset()
        smtp.sendmail("al@example.test", ["friend@remote.test"], message(sender='"Al" <al@example.test>'))
    wait_until(lambda: len(peer.received) == 1)
    assert peer.received[0].mail_from == "al@example.test"
    head = peer.received[0].data.split(b"\r\n\r\n", 1)[0]
    assert b"with ESMTPSA id" in head and b"(using TLSv1." in head  # 465: implicit TLS is TLS too


# -- acceptance 6 (first half): what submitted mail carries ---------------------------------


def test_submitted_mail_says_esmtpsa_gets_date_and_message_id_and_the_log_names_the_user(submit_server):
    server = submit_server()
    log = logging_lines(server)
    with connect(server) as smtp:
        smtp.starttls(context=client_context())
        smtp.ehlo("laptop.test")
        assert login_plain(smtp)[0] == 235
        smtp.sendmail("alice@example.test", ["carol@example.test"],
                      "From: alice@example.test\r\nSubject: bare\r\n\r\nno date, no id\r\n")
        smtp.sendmail("alice@example.test", ["carol@example.test"],
                      "From: alice@example.test\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
                      "Message-ID: <mine@laptop.test>\r\nSubject: full\r\n\r\nbody\r\n")
    wait_until(lambda: len(maildir(server, "carol")) == 2)
    msgs = {m["Subject"]: m for m in maildir(server, "carol")}
    bare, full = msgs["bare"], msgs["full"]
    assert "with ESMTPSA id" in bare["Received"] and "(using TLSv1." in bare["Received"]
    assert bare["Date"] and bare["Message-ID"].endswith("@mx.example.test>")
    assert full.get_all("Message-ID") == ["<mine@laptop.test>"] and len(full.get_all("Date")) == 1
    received = [line for line in log() if ": received from=<alice@example.test>" in line]
    assert len(received) == 2 and all(" user=alice" in line and " tls=TLSv1." in line for line in received)


# -- acceptance 4: certificate renewal without a restart -----------------------------------


def _served_subject(port: int, implicit: bool) -> str:
    import subprocess

    if implicit:
        sock = client_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    else:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        smtp.ehlo("x.test")
        smtp.starttls(context=client_context())
        sock = smtp.sock
    der = sock.getpeercert(binary_form=True)
    sock.close()
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject"], input=der,
                         capture_output=True, timeout=10)
    return out.stdout.decode()


def _make_cert(directory: Path, cn: str) -> tuple[Path, Path]:
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "c.pem", directory / "k.pem"
    done = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "1", "-subj", f"/CN={cn}"], capture_output=True, timeout=30)
    if done.returncode != 0:
        pytest.skip("openssl cannot make certificates here")
    return cert, key


def test_replaced_certificate_is_served_without_restart_and_a_broken_one_keeps_the_old(serve, tmp_path):
    live = tmp_path / "live"
    cert, key = _make_cert(live, "first.test")
    server = serve(tls={"cert": str(cert), "key": str(key)}, submission={"listen_tls": ["127.0.0.1:0"]})
    mx, implicit = server.port, sub_port(server, "submissions")
    assert "first.test" in _served_subject(mx, False) and "first.test" in _served_subject(implicit, True)
    new_cert, new_key = _make_cert(tmp_path / "new", "second.test")
    # As certbot renews: new files moved into place (key first, then the chain).
    key.write_bytes(new_key.read_bytes())
    cert.write_bytes(new_cert.read_bytes())
    time.sleep(1.1)  # the files are looked at once a second at most
    wait_until(lambda: "second.test" in _served_subject(mx, False), timeout=10)
    assert "second.test" in _served_subject(implicit, True)
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    time.sleep(1.1)
    for _ in range(3):
        assert "second.test" in _served_subject(mx, False)
        assert "second.test" in _served_subject(implicit, True)


def test_unusable_certificate_stops_start_up_with_the_key_named(tmp_path):
    path = write_config(tmp_path, tls={"cert": str(tmp_path / "missing.pem"), "key": str(tmp_path / "k.pem")})
    done = cli("serve", "-c", str(path), timeout=30)
    assert done.returncode == 2
    assert "tls.cert" in done.stderr and "missing.pem" in done.stderr and "Traceback" not in done.stderr


def test_submission_without_tls_is_a_config_error(tmp_path):
    path = write_config(tmp_path, submission={"listen": ["127.0.0.1:0"]})
    done = cli("check-config", "-c", str(path))
    assert done.returncode == 2 and "submission.listen" in done.stderr


def test_check_config_loads_the_certificate(tmp_path):
    files = tls_files(tmp_path)
    path = write_config(tmp_path, tls=files, submission={"listen": ["127.0.0.1:587"]})
    done = cli("check-config", "-c", str(path))
    assert done.returncode == 0 and "127.0.0.1:587 (submission)" in done.stdout, done.stderr
    Path(files["key"]).write_text("garbage\n")
    done = cli("check-config", "-c", str(path))
    assert done.returncode == 2 and "tls.cert" in done.stderr and "Traceback" not in done.stderr


def test_an_untrusted_client_without_auth_may_not_relay_even_over_tls(serve, dns, port, peers, tmp_path):
    """An untrusted client that has not authenticated may not relay, on any port."""
    server = relay(serve, dns, port, **submission_overrides(tmp_path))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(UNTRUSTED, 0), timeout=10) as smtp:
        smtp.ehlo("x.test")
        smtp.starttls(context=client_context())
        smtp.ehlo("x.test")
        smtp.docmd("MAIL", "FROM:<x@elsewhere.test>")
        code, text = smtp.docmd("RCPT", "TO:<friend@remote.test>")
        assert (code, text[:5]) == (554, b"5.7.1")


# -- acceptance 2, the Dovecot backend: the same answers from a real Dovecot ------------------


@pytest.mark.parametrize("kind", ["submission", "submissions"])
def test_dovecot_backend_authenticates_relays_and_blocks(serve, tmp_path, dns, port, peers, kind):
    from dovecot import running_dovecot

    dns.mx("remote.test", (10, "mx.remote.test"))
    dns.a("mx.remote.test", "127.0.0.2")
    peer = peers("127.0.0.2", port)
    with running_dovecot({"alice": PASSWORD}) as dv:
        server = serve(**submission_overrides(tmp_path, auth={"dovecot": f"dovecot:{dv.socket}"},
                                              dns={"nameservers": [dns.address], "timeout": "2s"},
                                              remote={"port": port}))
        with connect(server, kind) as smtp:
            if kind == "submission":
                smtp.ehlo("laptop.test")
                assert smtp.docmd("MAIL", "FROM:<alice@example.test>")[0] == 530
                smtp.starttls(context=client_context())
            smtp.ehlo("laptop.test")
            smtp.user, smtp.password = "alice", PASSWORD
            assert smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)[0] == 235
            smtp.sendmail("alice@example.test", ["friend@remote.test"], message())
            assert smtp.docmd("MAIL", "FROM:<bob@example.test>")[0] == 553
        wait_until(lambda: len(peer.received) == 1)
        for who in ("alice", "nosuchuser", "alice", "nosuchuser", "alice"):
            with connect(server, kind) as smtp:
                if kind == "submission":
                    smtp.starttls(context=client_context())
                smtp.ehlo("laptop.test")
                assert login_plain(smtp, who, "wrong") == (535, b"5.7.8 Authentication credentials invalid")
        with connect(server, kind) as smtp:
            if kind == "submission":
                smtp.starttls(context=client_context())
            smtp.ehlo("laptop.test")
            assert login_plain(smtp)[0] == 421


def test_bad_auth_exchanges_get_clear_answers_and_the_session_goes_on(submit_server):
    server = submit_server()
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        assert smtp.docmd("AUTH", "CRAM-MD5")[:1] == (504,)
        assert smtp.docmd("AUTH")[:1] == (501,)
        assert smtp.docmd("AUTH", "PLAIN !!!notbase64")[:1] == (501,)
        assert smtp.docmd("AUTH", "PLAIN " + base64.b64encode(b"no nul bytes").decode())[:1] == (501,)
        assert smtp.docmd("AUTH", "LOGIN")[0] == 334
        assert smtp.docmd("*")[:1] == (501,)  # the client cancels (RFC 4954 §4)
        assert smtp.docmd("AUTH", "PLAIN")[0] == 334
        assert smtp.docmd("A" * 3000)[0] in (500, 501)  # an over-long response line
        smtp.rset()
        assert login_plain(smtp)[0] == 235
        smtp.sendmail("alice@example.test", ["carol@example.test"], message())
    wait_until(lambda: len(maildir(server, "carol")) == 1)


def test_dovecot_down_is_a_temporary_failure(serve, tmp_path):
    server = serve(**submission_overrides(tmp_path, auth={"dovecot": f"dovecot:{tmp_path / 'no-such-socket'}"}))
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        code, text = login_plain(smtp)
        assert (code, text[:5]) == (454, b"4.7.0")
        assert smtp.noop()[0] == 250  # not counted as a password failure, not closed


# -- review: RFC 4616's authorization identity, RFC 4954's "=" ------------------------------


def test_plain_with_another_users_authzid_is_refused(submit_server):
    """``bob\\0alice\\0pw``: alice's password must not let her act as bob (RFC 4616 §2)."""
    server = submit_server()
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        as_bob = base64.b64encode(f"bob\0alice\0{PASSWORD}".encode()).decode()
        assert smtp.docmd("AUTH", f"PLAIN {as_bob}") == (535, b"5.7.8 Authentication credentials invalid")
        assert smtp.docmd("AUTH", "PLAIN =")[:1] == (501,)  # the empty initial response: no NULs in it
        assert smtp.docmd("AUTH", "PLAIN")[0] == 334  # the authzid on a 334 response, too
        assert smtp.docmd(as_bob)[0] == 535
        as_herself = base64.b64encode(f"Alice\0alice\0{PASSWORD}".encode()).decode()
        assert smtp.docmd("AUTH", f"PLAIN {as_herself}")[0] == 235
        assert smtp.docmd("MAIL", "FROM:<bob@example.test>")[0] == 553


def test_the_rest_of_an_over_long_auth_response_is_not_read_as_a_command(submit_server):
    server = submit_server()
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        assert smtp.docmd("AUTH", "PLAIN")[0] == 334
        smtp.send("A" * 3000)  # more than a line may hold, in two pieces
        time.sleep(0.3)
        smtp.send("AAAA\r\n")
        assert smtp.getreply() == (500, b"5.5.6 Authentication exchange line is too long")
        assert smtp.noop() == (250, b"2.0.0 OK")  # not a reply to "AAAA"
        assert login_plain(smtp)[0] == 235


def test_a_from_field_with_space_before_its_colon_is_checked_too(submit_server):
    """``From : bob@...`` (RFC 5322 §4.5's obsolete syntax, which readers still take as From)."""
    server = submit_server()
    with connect(server, "submissions") as smtp:
        smtp.ehlo("laptop.test")
        assert login_plain(smtp)[0] == 235
        for name in ("From :", "FROM\t:", "from:"):
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("alice@example.test", ["carol@example.test"],
                              f"{name} Bob <bob@example.test>\r\nSubject: x\r\n\r\nbody\r\n")
            assert refused.value.smtp_code == 550, name
            smtp.rset()
