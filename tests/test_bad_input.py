"""Bad input over real sockets: every hostile or broken thing a client can send gets a
clear reply with an enhanced status code, nothing of it is delivered, and the server
keeps serving (a fresh client still delivers to alice afterwards).

DESIGN invariants 5 (reject, don't repair, what can smuggle) and 6 (replies carry
enhanced status codes, RFC 2034 / RFC 3463). Exact bytes go over a raw ``socket``;
the "server still works" checks use the stdlib ``smtplib`` client.
"""

from __future__ import annotations

import mailbox
import re
import smtplib
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TIMEOUT = 5.0
ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}( |$)")


@dataclass
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return self.lines[0]


class Client:
    """A raw SMTP client: send exact bytes, read whole (multi-line) replies."""

    def __init__(self, port: int, *, greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""
        self.greeting = self.reply() if greet else None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection; unread {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> Reply:
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            assert re.match(r"\d{3}[ -]", line), f"malformed reply line {line!r}"
            lines.append(line)
            if line[3] == " ":
                break
        codes = {int(x[:3]) for x in lines}
        assert len(codes) == 1, f"mixed codes in one reply: {lines}"
        return Reply(codes.pop(), [x[4:] for x in lines])

    def cmd(self, line: bytes) -> Reply:
        self.send(line + b"\r\n")
        return self.reply()

    def nothing_more(self, wait: float = 0.4) -> None:
        """Assert the server sends nothing further for ``wait`` seconds."""
        assert self.buf == b"", f"unexpected extra reply data {self.buf!r}"
        self.sock.settimeout(wait)
        try:
            extra = self.sock.recv(65536)
        except TimeoutError:
            extra = None
        finally:
            self.sock.settimeout(TIMEOUT)
        assert extra is None, f"unexpected extra data from server: {extra!r}"

    def eof(self) -> bool:
        """True when the server has closed the connection (within the timeout)."""
        if self.buf:
            return False
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def ehlo(self) -> list[str]:
        r = self.cmd(b"EHLO client.test")
        assert r.code == 250, r
        return r.lines[1:]

    def mail_rcpt_data(self, rcpts: tuple[bytes, ...] = (b"alice@example.test",),
                       sender: bytes = b"sender@client.test") -> None:
        expect(self.cmd(b"MAIL FROM:<" + sender + b">"), 250, "2.1.0")
        for rcpt in rcpts:
            expect(self.cmd(b"RCPT TO:<" + rcpt + b">"), 250, "2.1.5")
        r = self.cmd(b"DATA")
        assert r.code == 354, r

    def message(self, body: bytes, **kw: Any) -> Reply:
        """One whole transaction; ``body`` is sent as is (it must end in CRLF) plus ``.``."""
        self.mail_rcpt_data(**kw)
        self.send(body + b".\r\n")
        return self.reply()


def expect(reply: Reply, code: int, status: str | None = None) -> None:
    assert reply.code == code, f"expected {code} {status or ''}, got {reply}"
    check_enhanced(reply)
    if status is not None:
        assert reply.text.split(" ", 1)[0] == status, f"expected {code} {status}, got {reply}"


def check_enhanced(reply: Reply) -> None:
    """Every line carries an enhanced status code whose class matches the reply code."""
    for line in reply.lines:
        m = ENHANCED.match(line)
        assert m, f"reply without an enhanced status code: {reply.code} {line!r}"
        assert m.group(1) == str(reply.code)[0], f"status class does not match code: {reply}"


def marker() -> bytes:
    return uuid.uuid4().hex.encode()


def msg(mark: bytes) -> bytes:
    return (b"From: sender@client.test\r\nTo: alice@example.test\r\nSubject: " + mark
            + b"\r\n\r\nbody " + mark + b"\r\n")


# -- what is on disk ---------------------------------------------------------------


def alice_messages(server: Any) -> list[bytes]:
    path = server.config.local.mail_dir / "alice"
    if not path.exists():
        return []
    box = mailbox.Maildir(path, factory=None, create=False)
    return [box.get_bytes(key) for key in box.iterkeys()]


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()} if path.exists() else set()


def assert_nothing_delivered(server: Any) -> None:
    """No mailbox file anywhere (new/, cur/, tmp/, mbox) and nothing in the spool."""
    cfg = server.config
    assert files_under(cfg.local.mail_dir) == set()
    assert [p.name for p in files_under(cfg.server.spool_dir) if p.suffix in (".json", ".msg")] == []


def assert_serving(server: Any) -> None:
    """A second, fresh client (stdlib smtplib) still delivers a normal message to alice."""
    mark = marker()
    before = len(alice_messages(server))
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="fresh.client.test", timeout=TIMEOUT) as s:
        refused = s.sendmail("fresh@client.test", ["alice@example.test"], msg(mark))
    assert refused == {}
    got = alice_messages(server)
    assert len(got) == before + 1
    assert sum(mark in m for m in got) == 1


# -- bare CR / LF, SMTP smuggling, NUL ---------------------------------------------

BAD_BODIES = {
    "bare-lf": b"Subject: bare lf\r\n\r\nline1\nline2\r\n",
    "bare-cr": b"Subject: bare cr\r\n\r\nline1\rline2\r\n",
    "bare-lf-in-header": b"Subject: x\nBcc: victim@example.test\r\n\r\nbody\r\n",
    "bare-lf-before-crlf": b"Subject: x\r\n\r\nbody\n\r\n",
    "nul-body": b"Subject: nul\r\n\r\nbefore\x00after\r\n",
    "nul-header": b"Subject: n\x00ul\r\n\r\nbody\r\n",
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_data_rejected_nothing_delivered(serve: Any, case: str) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.message(BAD_BODIES[case]), 554, "5.6.0")
        c.nothing_more()
        assert_nothing_delivered(server)
        # The same connection goes on with a clean transaction.
        mark = marker()
        expect(c.message(msg(mark)), 250, "2.0.0")
        assert [mark in m for m in alice_messages(server)] == [True]
    assert_serving(server)


SMUGGLED = (b"MAIL FROM:<smuggler@evil.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"DATA\r\n"
            b"From: ceo@example.test\r\nSubject: SMUGGLED\r\n\r\nSMUGGLED-BODY\r\n")

SMUGGLING = {
    # The end of DATA written with a bare LF somewhere, as in CVE-2023-51764 and friends.
    "crlf-dot-lf": b"Subject: first\r\n\r\nFIRST-BODY\r\n.\n" + SMUGGLED,
    "lf-dot-crlf": b"Subject: first\r\n\r\nFIRST-BODY\n.\r\n" + SMUGGLED,
    "lf-dot-lf": b"Subject: first\r\n\r\nFIRST-BODY\n.\n" + SMUGGLED,
    "cr-dot-crlf": b"Subject: first\r\n\r\nFIRST-BODY\r.\r\n" + SMUGGLED,
    "crlf-dot-cr": b"Subject: first\r\n\r\nFIRST-BODY\r\n.\r" + SMUGGLED,
}


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_smtp_smuggling_rejected(serve: Any, case: str) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        c.mail_rcpt_data()
        # One write: the bogus end of data, a whole second transaction, the real end.
        c.send(SMUGGLING[case] + b".\r\n")
        expect(c.reply(), 554, "5.6.0")
        # Exactly one reply: the smuggled MAIL/RCPT/DATA were never read as commands.
        c.nothing_more()
        assert_nothing_delivered(server)
        mark = marker()
        expect(c.message(msg(mark)), 250, "2.0.0")
        got = alice_messages(server)
        assert len(got) == 1 and mark in got[0]
        assert not any(b"SMUGGLED" in m or b"FIRST-BODY" in m for m in got)
    assert_serving(server)
    assert not any(b"SMUGGLED" in m for m in alice_messages(server))


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a\x00b@x.test>",
    b"MAIL FROM:<a@x.test>\x00",
    b"MAIL FROM:<a@x.test> SIZE=10\x00",
    b"EHLO a\x00b.test",
    b"NOOP a\x00b",
])
def test_nul_in_command_argument(serve: Any, line: bytes) -> None:
    server = serve()
    with Client(server.port) as c:
        if not line.startswith(b"EHLO"):
            c.ehlo()
        expect(c.cmd(line), 501, "5.5.2")
        if line.startswith(b"MAIL"):
            # The sender was not taken: RCPT still needs MAIL.
            expect(c.cmd(b"RCPT TO:<alice@example.test>"), 503, "5.5.1")
        else:
            c.ehlo()
        expect(c.message(msg(marker())), 250, "2.0.0")
    assert_serving(server)


def test_nul_in_rcpt_argument(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(b"MAIL FROM:<a@x.test>"), 250, "2.1.0")
        expect(c.cmd(b"RCPT TO:<alice\x00@example.test>"), 501, "5.5.2")
        expect(c.cmd(b"RCPT TO:<alice@example.test>\x00bob@example.test"), 501, "5.5.2")
        expect(c.cmd(b"DATA"), 503, "5.5.1")  # no recipient was taken
    assert_nothing_delivered(server)
    assert_serving(server)


def test_bare_cr_in_command_argument(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(b"MAIL FROM:<a@x.test>\rRCPT TO:<alice@example.test>"), 501, "5.5.2")
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 503, "5.5.1")
    assert_serving(server)


def test_bare_lf_in_command_line_refused(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@x.test>\nNOOP\r\n")
        first = c.reply()
        assert first.code >= 500, first  # not "250 2.1.0 Sender OK"
        check_enhanced(first)
        c.sock.settimeout(0.5)  # at most one more reply (for NOOP, if it is read as its own line)
        try:
            c.reply()
        except TimeoutError:
            pass
        finally:
            c.sock.settimeout(TIMEOUT)
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 503, "5.5.1")  # no sender was taken
    assert_serving(server)


def test_mail_from_without_path_refused(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        r = c.cmd(b"MAIL FROM:")
        assert r.code == 501, r
        check_enhanced(r)
        expect(c.cmd(b"MAIL FROM:<>"), 250, "2.1.0")
    assert_serving(server)


# -- over-long command lines and DATA lines -----------------------------------------


@pytest.mark.parametrize("length", [513, 600, 1001, 1002, 5000, 100_000])
def test_command_line_too_long(serve: Any, length: int) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        line = b"NOOP " + b"x" * (length - 5)
        assert len(line) == length
        expect(c.cmd(line), 500, "5.5.2")
        c.nothing_more(0.2)
        expect(c.cmd(b"NOOP"), 250)  # the same connection still works
        expect(c.message(msg(marker())), 250, "2.0.0")
    assert_serving(server)


def test_command_line_at_limit_accepted(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(b"NOOP " + b"x" * 505), 250)  # 510 octets + CRLF = 512
        expect(c.cmd(b"RCPT TO:<alice@example.test>" + b" " * 482), 503, "5.5.1")  # 510 octets: length is fine


@pytest.mark.parametrize("ehlos", [1, 40])
def test_mail_line_limit_does_not_grow_with_ehlo(serve: Any, ehlos: int) -> None:
    """MAIL may be 512 + 26 (SIZE, RFC 1870) + 10 (SMTPUTF8, RFC 6531) octets; repeated
    EHLOs (in this session or others) must not raise the limit."""
    server = serve()
    for _ in range(2):
        with Client(server.port) as c:
            for _ in range(ehlos):
                c.ehlo()
            base = b"MAIL FROM:<a@x.test> SIZE="
            ok = base + b"0" * (548 - len(base) - 1) + b"1"
            assert len(ok) == 548
            expect(c.cmd(ok), 250, "2.1.0")
            expect(c.cmd(b"RSET"), 250)
            expect(c.cmd(ok + b" BODY=8BITMIME"), 500, "5.5.2")
            expect(c.cmd(b"MAIL FROM:<a@x.test> SIZE=" + b"0" * 700 + b"1"), 500, "5.5.2")
    assert_serving(server)


def _long_line_body(n: int, prefix: bytes = b"") -> bytes:
    return b"Subject: long\r\n\r\n" + prefix + b"y" * n + b"\r\nend\r\n"


@pytest.mark.parametrize(("length", "code", "status"), [
    (999, 554, "5.6.0"),   # fits aiosmtpd's buffer; monomail's own check refuses it
    (1000, 554, "5.6.0"),  # aiosmtpd's line limit, same answer
    (5000, 554, "5.6.0"),
    (70_000, 554, "5.6.0"),  # longer than the stream reader's buffer limit
])
def test_data_line_too_long(serve: Any, length: int, code: int, status: str) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.message(_long_line_body(length)), code, status)
        c.nothing_more(0.2)
        assert_nothing_delivered(server)
        expect(c.message(msg(marker())), 250, "2.0.0")
    assert_serving(server)


def test_data_line_of_998_accepted(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.message(_long_line_body(998)), 250, "2.0.0")
        # A dot-stuffed line is 998 characters once the transparency dot is removed.
        expect(c.message(_long_line_body(997, prefix=b"..")), 250, "2.0.0")
    got = alice_messages(server)
    assert len(got) == 2
    assert sum(b"\n" + b"y" * 998 + b"\n" in m for m in got) == 1
    assert sum(b"\n." + b"y" * 997 + b"\n" in m for m in got) == 1
    assert all(len(line) <= 998 for m in got for line in m.split(b"\n"))
    assert_serving(server)


# -- invalid UTF-8 in addresses ------------------------------------------------------

BAD_UTF8 = [
    b"\xff\xfe",          # not UTF-8 at all
    b"a\xc3(",            # broken two-byte sequence
    b"\xc0\xae\xc0\xae",  # overlong encoding of "."
    b"\xed\xa0\x80",      # an encoded surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"caf\xc3",           # truncated at the end
]


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_invalid_utf8_in_rcpt(serve: Any, bad: bytes) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(b"MAIL FROM:<sender@client.test> SMTPUTF8"), 250, "2.1.0")
        expect(c.cmd(b"RCPT TO:<" + bad + b"@example.test>"), 553, "5.1.3")
        expect(c.cmd(b"RCPT TO:<alice@ex" + bad + b"ample.test>"), 553, "5.1.3")
        expect(c.cmd(b"DATA"), 503, "5.5.1")
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 250, "2.1.5")
    assert_nothing_delivered(server)
    assert_serving(server)


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_invalid_utf8_in_mail_from(serve: Any, bad: bytes) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(b"MAIL FROM:<" + bad + b"@client.test> SMTPUTF8"), 553, "5.1.3")
        expect(c.cmd(b"MAIL FROM:<" + bad + b"@client.test>"), 553, "5.1.3")
        expect(c.cmd(b"MAIL FROM:<sender@cl" + bad + b"ient.test> SMTPUTF8"), 553, "5.1.3")
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 503, "5.5.1")  # no sender was taken
        expect(c.message(msg(marker())), 250, "2.0.0")
    assert_serving(server)


# -- local parts that look like paths -------------------------------------------------


def _outside(server: Any, root: Path) -> set[Path]:
    cfg = server.config
    keep = (cfg.local.mail_dir, cfg.server.spool_dir)
    return {p for p in root.rglob("*") if not any(p == k or k in p.parents for k in keep)}


@pytest.mark.parametrize("local", [
    b"../../etc/x", b"a/b", b'"../x"', b"..", b"../alice", b"alice/../../x", b'"../../etc/x"',
    b"./alice", b'"/etc/x"', b'"alice/../.."',
])
def test_path_like_local_parts_refused(serve: Any, tmp_path: Path, local: bytes) -> None:
    server = serve()
    before = _outside(server, tmp_path)
    parent_before = set(tmp_path.parent.iterdir())
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(b"MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        expect(c.cmd(b"RCPT TO:<" + local + b"@example.test>"), 550, "5.1.1")
        r = c.cmd(b"RCPT TO:<" + local + b">")  # no domain: the primary domain, or a syntax error
        assert (r.code, r.text.split()[0]) in ((550, "5.1.1"), (553, "5.1.3")), r
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 250, "2.1.5")
        assert c.cmd(b"DATA").code == 354
        c.send(msg(marker()) + b".\r\n")
        expect(c.reply(), 250, "2.0.0")
    assert _outside(server, tmp_path) == before
    assert set(tmp_path.parent.iterdir()) == parent_before
    # Under mail_dir there is alice's Maildir and nothing else.
    mail_dir = server.config.local.mail_dir
    assert sorted(p.name for p in mail_dir.iterdir()) == ["alice"]
    assert sorted(p.name for p in (mail_dir / "alice").iterdir()) == ["cur", "new", "tmp"]
    assert len(alice_messages(server)) == 1
    assert_serving(server)


def test_tagged_path_like_local_part_stays_in_alices_maildir(serve: Any, tmp_path: Path) -> None:
    """``alice+../../x`` is alice with a tag: delivered to her Maildir, no path from the tag."""
    server = serve()
    before = _outside(server, tmp_path)
    with Client(server.port) as c:
        c.ehlo()
        expect(c.message(msg(marker()), rcpts=(b"alice+../../etc/x@example.test",)), 250, "2.0.0")
    assert _outside(server, tmp_path) == before
    mail_dir = server.config.local.mail_dir
    assert sorted(p.name for p in mail_dir.iterdir()) == ["alice"]
    assert len(files_under(mail_dir / "alice" / "new")) == 1
    assert files_under(mail_dir) == files_under(mail_dir / "alice" / "new")


# -- SIZE ------------------------------------------------------------------------------


def test_size_limits(serve: Any) -> None:
    server = serve(server={"max_message_size": 10000})
    with Client(server.port) as c:
        assert "SIZE 10000" in c.ehlo()
        expect(c.cmd(b"MAIL FROM:<sender@client.test> SIZE=10001"), 552, "5.3.4")
        expect(c.cmd(b"MAIL FROM:<sender@client.test> SIZE=99999999999999999999"), 552, "5.3.4")
        expect(c.cmd(b"MAIL FROM:<sender@client.test> SIZE=abc"), 501, "5.5.4")
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 503, "5.5.1")  # none of those took
        expect(c.cmd(b"MAIL FROM:<sender@client.test> SIZE=10000"), 250, "2.1.0")
        expect(c.cmd(b"RSET"), 250)
        # Over the limit in DATA, without a SIZE declaration.
        big = b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 120  # 12 000 octets
        expect(c.message(big), 552, "5.3.4")
        c.nothing_more(0.2)
        assert_nothing_delivered(server)
        # Over the limit in DATA, after declaring a small SIZE.
        expect(c.cmd(b"MAIL FROM:<sender@client.test> SIZE=100"), 250, "2.1.0")
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 250, "2.1.5")
        assert c.cmd(b"DATA").code == 354
        c.send(big + b".\r\n")
        expect(c.reply(), 552, "5.3.4")
        assert_nothing_delivered(server)
        # Just under the limit is fine on the same connection.
        fits = b"Subject: fits\r\n\r\n" + (b"z" * 98 + b"\r\n") * 95
        expect(c.message(fits), 250, "2.0.0")
    assert len(alice_messages(server)) == 1
    assert_serving(server)


# -- max_recipients, max_connections, max_received_headers ----------------------------


def test_max_recipients(serve: Any) -> None:
    server = serve(server={"max_recipients": 3})
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(b"MAIL FROM:<sender@client.test>"), 250, "2.1.0")
        for rcpt in (b"alice", b"bob", b"carol"):
            expect(c.cmd(b"RCPT TO:<" + rcpt + b"@example.test>"), 250, "2.1.5")
        expect(c.cmd(b"RCPT TO:<postmaster@example.test>"), 452, "4.5.3")
        expect(c.cmd(b"RCPT TO:<team@example.test>"), 452, "4.5.3")
        assert c.cmd(b"DATA").code == 354
        c.send(msg(marker()) + b".\r\n")
        expect(c.reply(), 250, "2.0.0")
        # The count is per transaction.
        expect(c.message(msg(marker()), rcpts=(b"alice@example.test", b"carol@example.test")), 250, "2.0.0")
    assert len(alice_messages(server)) == 2
    assert_serving(server)


def test_max_connections(serve: Any) -> None:
    server = serve(server={"max_connections": 2})
    c1, c2 = Client(server.port), Client(server.port)
    try:
        assert c1.greeting and c1.greeting.code == 220
        assert c2.greeting and c2.greeting.code == 220
        with Client(server.port, greet=False) as c3:
            expect(c3.reply(), 421, "4.7.0")
            assert c3.eof()
        # The two admitted sessions are unharmed.
        c1.ehlo()
        expect(c2.cmd(b"NOOP"), 250)
        expect(c1.message(msg(marker())), 250, "2.0.0")
        expect(c1.cmd(b"QUIT"), 221)
        assert c1.eof()
        c1.close()
        # A slot is free again (connection_lost may take a loop turn to be seen).
        deadline = time.monotonic() + 3
        while True:
            with Client(server.port, greet=False) as c4:
                r = c4.reply()
                if r.code == 220:
                    c4.ehlo()
                    expect(c4.message(msg(marker())), 250, "2.0.0")
                    break
            expect(r, 421, "4.7.0")
            assert time.monotonic() < deadline, "no slot freed after a client quit"
            time.sleep(0.05)
    finally:
        c1.close()
        c2.close()
    assert len(alice_messages(server)) == 2
    deadline = time.monotonic() + 3
    while len(server.app.server.sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_serving(server)


def _received(n: int, mark: bytes) -> bytes:
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i + 1)
                    for i in range(n))
    return hops + b"Subject: " + mark + b"\r\n\r\nbody\r\n"


def test_max_received_headers(serve: Any) -> None:
    server = serve(server={"max_received_headers": 5})
    with Client(server.port) as c:
        c.ehlo()
        expect(c.message(_received(6, marker())), 554, "5.4.6")
        assert_nothing_delivered(server)
        expect(c.message(_received(50, marker())), 554, "5.4.6")
        assert_nothing_delivered(server)
        mark = marker()
        expect(c.message(_received(5, mark)), 250, "2.0.0")
    got = alice_messages(server)
    assert len(got) == 1 and mark in got[0]
    assert len(re.findall(rb"^Received:", got[0], re.MULTILINE | re.IGNORECASE)) == 6  # five + ours
    assert_serving(server)


# -- command order, unknown commands, enhanced status codes ---------------------------


def test_commands_out_of_order(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        assert c.greeting and c.greeting.code == 220
        for line in (b"MAIL FROM:<a@x.test>", b"RCPT TO:<alice@example.test>", b"DATA"):
            expect(c.cmd(line), 503, "5.5.1")
        c.ehlo()
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 503, "5.5.1")
        expect(c.cmd(b"DATA"), 503, "5.5.1")
        expect(c.cmd(b"MAIL FROM:<a@x.test>"), 250, "2.1.0")
        expect(c.cmd(b"MAIL FROM:<a@x.test>"), 503, "5.5.1")
        expect(c.cmd(b"DATA"), 503, "5.5.1")
        expect(c.cmd(b"RCPT TO:<nobody@example.test>"), 550, "5.1.1")
        expect(c.cmd(b"DATA"), 503, "5.5.1")
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 250, "2.1.5")
        assert c.cmd(b"DATA").code == 354
        c.send(msg(marker()) + b".\r\n")
        expect(c.reply(), 250, "2.0.0")
        expect(c.cmd(b"DATA"), 503, "5.5.1")  # the transaction is over
    assert_serving(server)


@pytest.mark.parametrize("line", [b"FOO", b"MAILFROM:<a@x.test>", b"TURN", b"BDAT 10 LAST", b"\xff\xfe",
                                  b"NO\x00OP", b"X" * 100])
def test_unknown_command(serve: Any, line: bytes) -> None:
    server = serve()
    with Client(server.port) as c:
        r = c.cmd(line)
        assert r.code in (500, 502), r
        expect(r, r.code, "5.5.2" if line == b"\xff\xfe" else "5.5.1")
        c.ehlo()
        r = c.cmd(line)
        assert r.code in (500, 502), r
        check_enhanced(r)
        expect(c.message(msg(marker())), 250, "2.0.0")
    assert_serving(server)


def test_every_reply_has_an_enhanced_status_code(serve: Any) -> None:
    """Apart from the greeting, the HELO/EHLO replies and 354 (RFC 2034 §3)."""
    server = serve(server={"max_recipients": 2, "trusted_networks": ["192.0.2.0/24"], "max_errors": 1000})
    script: list[tuple[bytes, int | None]] = [  # (command, exact code where it matters)
        (b"MAIL FROM:<a@x.test>", 503), (b"NOOP", 250), (b"RSET", 250), (b"VRFY alice", None),
        (b"EXPN team", None), (b"HELP", None), (b"HELP FOO", None), (b"", 500), (b"   ", 500),
        (b"FOO bar", 500), (b"STARTTLS", None), (b"AUTH PLAIN", None), (b"EHLO client.test", 250),
        (b"NOOP hello", 250), (b"RSET x", 501), (b"RSET", 250), (b"DATA", 503), (b"DATA x", 503),
        (b"RCPT TO:<alice@example.test>", 503), (b"MAIL", 501), (b"MAIL TO:<a@x.test>", 501),
        (b"MAIL FROM:", None), (b"RSET", 250), (b"MAIL FROM:<a@x.test", 553), (b"MAIL FROM:<a@x.test> FOO=1", 555),
        (b"MAIL FROM:<a@x.test> BODY=BINARYMIME", 501), (b"MAIL FROM:<a@x.test> SIZE=x", 501),
        (b"MAIL FROM:<a@x.test> SIZE=", 501), (b"MAIL FROM:<a@@x.test>", 553),
        (b"MAIL FROM:<" + b"a" * 300 + b"@x.test>", 553), (b"MAIL FROM:<\xc3\xa9@x.test>", 553),
        (b"MAIL FROM:<a@x.test> SMTPUTF8=yes", 555), (b"MAIL FROM:<a@x.test> BODY=8BITMIME SMTPUTF8", 250),
        (b"MAIL FROM:<b@x.test>", 503), (b"RCPT", 501), (b"RCPT FROM:<alice@example.test>", 501),
        (b"RCPT TO:<>", 501), (b"RCPT TO:<alice@example.test> FOO=bar", 555),
        (b"RCPT TO:<nobody@example.test>", 550), (b"RCPT TO:<x@remote.test>", 554),
        (b"RCPT TO:<x@[192.0.2.1]>", 554), (b"RCPT TO:<a@b@example.test>", 553),
        (b"RCPT TO:<alice@-bad-.test>", 553), (b"RCPT TO:<" + b"a" * 65 + b"@example.test>", 553),
        (b"RCPT TO:<alice@example.test>", 250), (b"RCPT TO:<bob@example.test>", 250),
        (b"RCPT TO:<carol@example.test>", 452), (b"VRFY", 501), (b"NOOP \x00", 501), (b"NOOP a\rb", 501),
        (b"NOOP " + b"x" * 600, 500),
    ]
    with Client(server.port) as c:
        assert c.greeting and c.greeting.code == 220
        for line, code in script:
            r = c.cmd(line)
            if code is not None:
                assert r.code == code, (line, r)
            if not line.startswith(b"EHLO"):
                check_enhanced(r)
        assert c.cmd(b"DATA").code == 354
        c.send(msg(marker()) + b".\r\n")
        expect(c.reply(), 250, "2.0.0")
        expect(c.cmd(b"QUIT"), 221, "2.0.0")
        assert c.eof()
    assert len(alice_messages(server)) == 1
    assert_serving(server)


def test_help(serve: Any) -> None:
    """HELP answers 214 (RFC 5321 §4.3.2), as ``sendmail -bs`` always did (serve said 250)."""
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        r = c.cmd(b"HELP")
        expect(r, 214, "2.0.0")
        assert {"MAIL", "RCPT", "DATA", "QUIT"} <= set(r.text.split(":", 1)[1].split())
        r = c.cmd(b"HELP MAIL")
        expect(r, 214, "2.0.0")
        assert "MAIL FROM:" in r.text
        expect(c.cmd(b"HELP FOO"), 504, "5.5.4")


# -- EHLO and PIPELINING --------------------------------------------------------------


def test_ehlo_advertises_extensions(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        assert c.greeting and c.greeting.code == 220
        exts = c.ehlo()
    names = {e.split()[0].upper() for e in exts}
    assert {"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"} <= names
    assert f"SIZE {server.config.server.max_message_size}" in exts
    assert "STARTTLS" not in names and "AUTH" not in names  # not offered: not built


def test_pipelined_batch(serve: Any) -> None:
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        mark1, mark2 = marker(), marker()
        c.send(b"MAIL FROM:<sender@client.test>\r\n"
               b"RCPT TO:<alice@example.test>\r\n"
               b"RCPT TO:<nobody@example.test>\r\n"
               b"RCPT TO:<carol@example.test>\r\n"
               b"DATA\r\n")
        expect(c.reply(), 250, "2.1.0")
        expect(c.reply(), 250, "2.1.5")
        expect(c.reply(), 550, "5.1.1")
        expect(c.reply(), 250, "2.1.5")
        assert c.reply().code == 354
        c.nothing_more(0.2)
        # The end of data, then a whole second transaction, in one write.
        c.send(msg(mark1) + b".\r\n"
               b"MAIL FROM:<sender@client.test>\r\n"
               b"RCPT TO:<alice@example.test>\r\n"
               b"DATA\r\n")
        expect(c.reply(), 250, "2.0.0")
        expect(c.reply(), 250, "2.1.0")
        expect(c.reply(), 250, "2.1.5")
        assert c.reply().code == 354
        c.send(msg(mark2) + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        expect(c.reply(), 250, "2.0.0")
        expect(c.reply(), 250)
        expect(c.reply(), 250)
        expect(c.reply(), 221)
        assert c.eof()
        # A batch whose only recipient fails: DATA gets 503, not 354.
        with Client(server.port) as d:
            d.ehlo()
            d.send(b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\nNOOP\r\n")
            expect(d.reply(), 250, "2.1.0")
            expect(d.reply(), 550, "5.1.1")
            expect(d.reply(), 503, "5.5.1")
            expect(d.reply(), 250)
            d.nothing_more(0.2)
    got = alice_messages(server)
    assert sorted(mark1 in m for m in got) == [False, True] and sum(mark2 in m for m in got) == 1
    carol = mailbox.Maildir(server.config.local.mail_dir / "carol", factory=None, create=False)
    assert [mark1 in carol.get_bytes(k) for k in carol.iterkeys()] == [True]
    assert_serving(server)


def test_a_whole_session_in_one_write_then_half_closed_is_answered_to_the_end(serve: Any) -> None:
    """A client that writes everything, QUIT included, and shuts its side at once: the
    message is delivered and every reply, the 221 last, still comes (issue 13: commands
    are decided as they arrive, and the end of DATA waits for the queue in a task)."""
    server = serve()
    mark = marker()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall(b"EHLO client.test\r\nMAIL FROM:<sender@client.test>\r\nRCPT TO:<alice@example.test>\r\n"
                  b"DATA\r\n" + msg(mark) + b".\r\nQUIT\r\n")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    codes = [line[:4] for line in got.split(b"\r\n") if line]
    assert codes[0] == b"220 " and codes[-4:] == [b"250 ", b"354 ", b"250 ", b"221 "], got
    assert b"250 2.0.0" in got
    assert [mark in m for m in alice_messages(server)] == [True]
    assert_serving(server)


def test_a_big_message_and_the_commands_behind_it_in_one_write_arrive_whole(serve: Any) -> None:
    """4 MB of content, the end line and two more commands in one write: the content is
    checked a slice at a time (issue 13: reading pauses meanwhile), every byte lands in the
    Maildir in order, and the pipelined NOOP and QUIT are answered after the 250."""
    server = serve()
    mark = marker()
    body = b"".join(b"line %07d " % n + b"x" * 60 + b"\r\n" for n in range(60_000))
    with Client(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        expect(c.reply(), 250, "2.1.0")
        expect(c.reply(), 250, "2.1.5")
        assert c.reply().code == 354
        c.send(msg(mark) + body + b".\r\nNOOP\r\nQUIT\r\n")
        expect(c.reply(), 250, "2.0.0")
        expect(c.reply(), 250)
        expect(c.reply(), 221)
    [got] = alice_messages(server)
    assert got.endswith(mark + b"\n" + body.replace(b"\r\n", b"\n"))
    assert_serving(server)
