"""Review of the server's own SMTP sessions (issue 13): flow control, deadlines and slots
through real sockets."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time

import pytest
from conftest import wait_until
from peers import self_signed_cert

from monomail import maillog

pytestmark = pytest.mark.timeout(60)


def delivered(server) -> int:
    new = server.config.local.mail_dir / "alice" / "new"
    return len(list(new.iterdir())) if new.is_dir() else 0


def read_until(s: socket.socket, marker: bytes, limit: float) -> bytes:
    got = b""
    deadline = time.monotonic() + limit
    s.settimeout(0.5)
    while marker not in got and time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    return got


def test_commands_buffered_while_replies_were_unread_are_answered_when_they_are_read(serve):
    # A pipelining client that reads its replies only after sending everything: the
    # server's writes pause, the message's reply is written while they are paused, and
    # the QUIT read meanwhile must be answered once the client reads (not left waiting).
    server = serve(server={"command_timeout": "30s"})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    batch = (b"EHLO x.test\r\n" * 2000 + b"HELP\r\n" * 40000 + b"MAIL FROM:<a@x.test>\r\n"
             b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
    tail = b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    sender = threading.Thread(target=lambda: s.sendall(batch + tail), daemon=True)
    sender.start()
    with contextlib.suppress(AssertionError):  # (if the server read it all before it paused)
        wait_until(lambda: delivered(server) == 1, 5)  # the replies unread meanwhile
    got = read_until(s, b"221 ", 10)
    sender.join(5)
    s.close()
    assert b"250 2.0.0" in got.split(b"354 ")[-1] and b"221 " in got


def _never_reading_client(port: int) -> socket.socket:
    """A client on 127.0.0.9 with a tiny receive buffer that floods commands from a thread
    and never reads a reply."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind(("127.0.0.9", 0))
    s.connect(("127.0.0.1", port))

    def flood() -> None:
        with contextlib.suppress(OSError):
            s.sendall(b"EHLO x.test\r\n" + b"HELP\r\n" * 2_000_000)

    threading.Thread(target=flood, daemon=True).start()
    return s


def test_a_client_that_never_reads_loses_its_slot_after_the_deadline(serve):
    # It floods commands and never reads a reply: the server's writes back up, the command
    # deadline passes, the session is hung up, and its connection slot must come back
    # (a close that waits forever for the client to read kept it, and its count, for good).
    server = serve(server={"trusted_networks": ["127.0.0.1/32"], "max_connections_per_ip": 1,
                           "command_timeout": "2s", "timeout": "3s"})
    s = _never_reading_client(server.port)
    try:
        wait_until(lambda: server.app.server.per_client.count("127.0.0.9") == 1)
        wait_until(lambda: not server.app.server.sessions, 20)
        assert server.app.server.per_client.count("127.0.0.9") == 0
    finally:
        s.close()


def tls_client_with_first_command(raw: socket.socket, command: bytes) -> tuple[ssl.SSLObject, ssl.MemoryBIO,
                                                                              ssl.MemoryBIO]:
    """A TLS handshake whose last flight carries ``command`` too (one write: the client's
    Finished and its first record, as a TLS 1.3 client may send them)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    raw.settimeout(10)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))
    obj.write(command)
    raw.sendall(outgoing.read())  # the Finished and the command together
    return obj, incoming, outgoing


def tls_read_line(raw: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, got: bytearray) -> bytes:
    while b"\n" not in got:
        try:
            got += obj.read(65536)
        except ssl.SSLWantReadError:
            chunk = raw.recv(65536)
            if not chunk:
                return b""
            incoming.write(chunk)
    i = got.index(b"\n") + 1
    line = bytes(got[:i])
    del got[:i]
    return line


@pytest.mark.parametrize("kind", ["mx", "submissions"])
def test_a_command_in_the_same_segment_as_the_end_of_the_tls_handshake_is_answered(serve, tmp_path, kind):
    made = self_signed_cert(tmp_path / "tls")
    if made is None:
        pytest.skip("cannot make a certificate")
    cert, key = made
    server = serve(tls={"cert": cert, "key": key},
                   submission={"listen": ["127.0.0.1:0"], "listen_tls": ["127.0.0.1:0"]})
    with socket.create_connection(("127.0.0.1", server.app.server.port(kind)), timeout=10) as raw:
        got = bytearray()
        if kind == "mx":
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"EHLO x.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220 ")
        obj, incoming, _ = tls_client_with_first_command(raw, b"EHLO x.test\r\n")
        if kind == "submissions":
            assert tls_read_line(raw, obj, incoming, got).startswith(b"220 ")
        line = tls_read_line(raw, obj, incoming, got)
        assert line.startswith(b"250"), line  # the EHLO was answered (not dropped with the plain text)


class SessionLines(logging.Handler):
    """Each line of monomail with the session id in force when it was written."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), maillog.SESSION.get()))


def test_the_deadline_lines_carry_the_session_id(serve):
    server = serve(server={"trusted_networks": ["192.0.2.0/24"], "command_timeout": "1s"})
    handler = SessionLines()
    logger = logging.getLogger("monomail")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO x.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<v@remote.test>\r\n")  # refused: logged
            assert f.readline().startswith(b"421 4.4.2") or b"421 4.4.2" in f.read()
        wait_until(lambda: any("timeout waiting" in m for m, _ in handler.lines))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    (refused,) = [sid for m, sid in handler.lines if m.startswith("refused RCPT")]
    (timeout,) = [sid for m, sid in handler.lines if "timeout waiting" in m]
    assert refused and timeout == refused, handler.lines


def test_shutdown_cuts_a_client_that_never_reads(serve):
    # After the grace the remaining sessions are closed; one whose client never reads its
    # replies must go too (its close waited for the client: uvloop's wait_closed with it).
    server = serve(server={"trusted_networks": ["127.0.0.1/32"], "command_timeout": "5m", "timeout": "5m",
                           "shutdown_grace": "1s"})
    s = _never_reading_client(server.port)
    smtp = server.app.server
    try:
        wait_until(lambda: smtp.per_client.count("127.0.0.9") == 1)
        time.sleep(1.5)  # its replies back up
        server.call(smtp.close(1.0))
        wait_until(lambda: not smtp.sessions, 5)
    finally:
        s.close()


def test_a_refused_connection_line_carries_no_other_session_id(process_server, tmp_path):
    # uvloop runs every connection's callbacks of one listener in one context: the
    # refusal written in connection_made must not carry the id of the last session read.
    logfile = tmp_path / "mail.log"
    server = process_server(log={"level": "info", "file": str(logfile)},
                            server={"trusted_networks": ["192.0.2.0/24"], "max_connections_per_ip": 1})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as first:
        f = first.makefile("rb")
        f.readline()
        first.sendall(b"EHLO x.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<v@remote.test>\r\n")  # a line with its id
        while not f.readline().startswith(b"554 "):
            pass
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as second:
            assert second.recv(1000).startswith(b"421 4.7.0")

        def lines(word: str) -> list[str]:
            return [x for x in logfile.read_text(encoding="utf-8").splitlines() if word in x]

        wait_until(lambda: lines("refused connection from") and lines("refused RCPT"))
    (refusal,) = lines("refused connection from")
    (rcpt,) = lines("refused RCPT")
    assert "session=" in rcpt and "session=" not in refusal, refusal
    assert server.terminate() == 0


def tls_read_until(raw: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, marker: bytes,
                   limit: float) -> bytes:
    got = b""
    deadline = time.monotonic() + limit
    raw.settimeout(0.5)
    while marker not in got and time.monotonic() < deadline:
        try:
            got += obj.read(1 << 20)
            continue
        except ssl.SSLWantReadError:
            pass
        try:
            chunk = raw.recv(1 << 20)
        except TimeoutError:
            continue
        if not chunk:
            break
        incoming.write(chunk)
    return got


def test_an_auth_exchange_begun_while_the_replies_waited_unread_reads_its_response(serve, tmp_path):
    # The client pipelines many commands and AUTH, reads its replies late, then answers
    # the 334: the server paused reading while its writes backed up; once they are read
    # the exchange must read the response (it stayed paused: 421 at the AUTH deadline).
    made = self_signed_cert(tmp_path / "tls")
    if made is None:
        pytest.skip("cannot make a certificate")
    cert, key = made
    server = serve(tls={"cert": cert, "key": key}, server={"command_timeout": "15s"},
                   submission={"listen": ["127.0.0.1:0"], "listen_tls": ["127.0.0.1:0"]})
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.app.server.port("submissions")))
    try:
        obj, incoming, outgoing = tls_client_with_first_command(raw, b"EHLO x.test\r\n")
        assert b"250 " in tls_read_until(raw, obj, incoming, b"250 ", 10)
        obj.write(b"EHLO x.test\r\n" * 19000 + b"HELP\r\n" * 40000 + b"AUTH PLAIN\r\n")
        batch = outgoing.read()
        sender = threading.Thread(target=lambda: raw.sendall(batch), daemon=True)
        sender.start()
        time.sleep(2)  # the replies pile up unread
        assert b"334 " in tls_read_until(raw, obj, incoming, b"334 ", 20)
        sender.join(5)
        obj.write(b"AGFsaWNlAHdyb25n\r\n")  # \0alice\0wrong
        raw.sendall(outgoing.read())
        answer = tls_read_until(raw, obj, incoming, b"\r\n", 10)
        assert answer.startswith(b"535 "), answer
    finally:
        raw.close()
