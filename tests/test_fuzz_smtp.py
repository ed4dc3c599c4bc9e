"""Hostile and random input over a real socket: every reply is a well-formed SMTP reply
with an enhanced status code, nothing reaches a traceback, and what a client sent reaches
the log escaped (issue 8, defect 12).

The fuzzing is a seeded ``random.Random`` (no extra dependency; a failure replays
exactly): adversarial command lines built from SMTP verbs, paths, ESMTP parameters with
digits from many scripts, invalid UTF-8, control and formatting characters, over-long
lines, bare CR/LF and NUL, and message content with the same, against a running server.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any

import pytest
from test_bad_input import ENHANCED, Client, Reply, assert_serving, expect

SEED = 20260812
LINES = 2000
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

VERBS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP", b"QUIT",
         b"STARTTLS", b"AUTH", b"BDAT", b"XYZZY", b"mail", b"Rcpt", b"", b"\xff", b"MAIL\x00", b"M\xc3\xa4IL"]
DIGITS = ["0123456789", "²³¹", "١٢٣٤٥", "۱۲۳", "１２３", "߁߂", "๑๒", "𝟏𝟐", "-+.e", "\u0660"]
ODD_TEXT = [b"\x00", b"\r", b"\x1b[31m", b"\x07", b"\x7f", b"\xc2\x85", b"\xe2\x80\xae", b"\xe2\x80\xa8", b"\xff\xfe",
            b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xae", b"%", b"!", b"\"", b"\\", b"<", b">", b"@",
            b":", b",", b"=", b" ", b"\t", "é".encode(), "日本".encode()]


def _word(rng: random.Random, n: int = 12) -> bytes:
    out = b""
    for _ in range(rng.randint(0, n)):
        out += rng.choice(ODD_TEXT) if rng.random() < 0.3 else bytes([rng.randint(0x21, 0x7e)])
    return out


def _address(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.3:
        return rng.choice([b"alice@example.test", b"bob@example.test", b"nobody@example.test", b"a@x.test",
                           b"postmaster", b"", b"x@remote.test", b"@a,@b:alice@example.test"])
    if choice < 0.6:
        return _word(rng, 8) + b"@" + _word(rng, 8)
    return _word(rng, 30)


def _params(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randint(0, 3)):
        key = rng.choice([b"SIZE", b"BODY", b"SMTPUTF8", b"NOTIFY", b"size", b"X-" + _word(rng, 3), _word(rng, 4)])
        if key.upper() == b"SIZE" and rng.random() < 0.8:
            digits = rng.choice(DIGITS)
            value = "".join(rng.choice(digits) for _ in range(rng.randint(0, 25))).encode()
        elif key.upper() == b"BODY":
            value = rng.choice([b"7BIT", b"8BITMIME", b"BINARYMIME", b"8bitmime", _word(rng, 5)])
        else:
            value = _word(rng, 6)
        out.append(key if rng.random() < 0.2 else key + b"=" + value)
    return b" ".join(out)


def random_line(rng: random.Random) -> bytes:
    """One command line, without its ending; it never holds an LF (one line, one reply)."""
    verb = rng.choice(VERBS)
    kind = rng.random()
    if verb.upper() == b"MAIL" and kind < 0.8:
        line = verb + b" FROM:<" + _address(rng) + b"> " + _params(rng)
    elif verb.upper() == b"RCPT" and kind < 0.8:
        line = verb + b" TO:<" + _address(rng) + b"> " + _params(rng)
    elif kind < 0.9:
        line = verb + b" " + _word(rng, 20)
    else:
        line = verb + b" " + bytes(rng.randint(1, 255) for _ in range(rng.choice([10, 600, 1100, 5000])))
    return line.replace(b"\n", b"")


def random_content(rng: random.Random) -> bytes:
    """Message content that ends only at the end-of-data line appended after it."""
    while True:
        lines = []
        for _ in range(rng.randint(0, 60)):
            roll = rng.random()
            if roll < 0.05:
                lines.append(b"y" * rng.choice([998, 999, 1000, 5000]))
            elif roll < 0.1:
                lines.append(b"." + _word(rng, 5))
            elif roll < 0.15:
                lines.append(b"Received: from x by y")
            else:
                lines.append(_word(rng, 40))
        seps = [rng.choice([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"]) for _ in lines]
        content = b"".join(line + sep for line, sep in zip(lines, seps, strict=True))
        stream = b"\r\n" + content + b"\r\n.\r\n"
        if stream.find(b"\r\n.\r\n") == len(stream) - 5:
            return content


def check_reply(reply: Reply, sent: bytes) -> None:
    assert 200 <= reply.code < 600, (sent, reply)
    verb = sent.split(b" ", 1)[0].upper()
    if reply.code == 354 or (reply.code == 250 and verb in (b"EHLO", b"HELO")):
        return  # RFC 2034: no enhanced status code on these
    for line in reply.lines:
        m = ENHANCED.match(line)
        assert m and m.group(1) == str(reply.code)[0], (sent, reply)


def assert_clean_log(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    assert "internal error" not in caplog.text.lower()
    for record in caplog.records:
        assert not CONTROL.search(record.getMessage()), record.getMessage()


def test_fuzzed_command_lines(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(server={"max_message_size": 100_000})
    rng = random.Random(SEED)
    sent = 0
    data_seen = 0
    while sent < LINES:
        with Client(server.port) as c:
            assert c.greeting is not None and c.greeting.code == 220
            if rng.random() < 0.7:
                c.ehlo()
            for _ in range(rng.randint(1, 40)):
                line = random_line(rng)
                c.send(line + (b"\n" if rng.random() < 0.1 else b"\r\n"))
                reply = c.reply()
                sent += 1
                check_reply(reply, line)
                if reply.code == 354:
                    data_seen += 1
                    c.send(random_content(rng) + b"\r\n.\r\n")
                    check_reply(c.reply(), b"(end of data)")
                if reply.code == 421 or (reply.code == 221 and line[:4].upper() == b"QUIT"):
                    assert c.eof()
                    break
            else:
                if rng.random() < 0.5:  # now and then a whole transaction, random content
                    c.ehlo()
                    c.mail_rcpt_data()
                    data_seen += 1
                    c.send(random_content(rng) + b"\r\n.\r\n")
                    check_reply(c.reply(), b"(end of data)")
    assert data_seen > 0
    assert_clean_log(caplog)
    assert_serving(server)


@pytest.mark.parametrize("line, code, status", [
    (b"MAIL FROM:<a@b.test> SIZE=\xc2\xb2", 501, "5.5.4"),  # "²": isdigit() yes, int() no: was 451 + traceback
    (b"MAIL FROM:<a@b.test> SIZE=\xd9\xa1\xd9\xa2\xd9\xa3", 501, "5.5.4"),  # Arabic-Indic 123: was accepted
    (b"MAIL FROM:<a@b.test> SIZE=\xef\xbc\x91\xef\xbc\x92", 501, "5.5.4"),  # full-width 12: was accepted
    (b"MAIL FROM:<a@b.test> SIZE=\xff", 501, "5.5.4"),
    (b"VRFY \xff\xfe", 252, "2.5.2"),  # was 451 + traceback
    (b"VRFY <\xc3(@example.test>", 252, "2.5.2"),
    (b"VRFY alice", 252, "2.5.2"),
])
def test_defect_12_inputs(serve: Any, caplog: pytest.LogCaptureFixture, line: bytes, code: int, status: str) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve()
    with Client(server.port) as c:
        c.ehlo()
        expect(c.cmd(line), code, status)
        expect(c.cmd(b"RSET"), 250, "2.0.0")
        expect(c.message(b"Subject: after\r\n\r\nok\r\n"), 250, "2.0.0")
    assert_clean_log(caplog)


def test_client_bytes_in_the_log_are_escaped(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The HELO name, the sender and a refused recipient line reach the log escaped."""
    caplog.set_level(logging.DEBUG)
    server = serve(server={"trusted_networks": ["192.0.2.0/24"]})
    with Client(server.port) as c:
        assert c.cmd(b"EHLO evil\x1b[2J\x07.test\xff").code == 250
        expect(c.cmd(b"MAIL FROM:<\xe2\x80\xaeevil@x.test> SMTPUTF8"), 250, "2.1.0")
        expect(c.cmd(b"RCPT TO:<x\x1b@remote.test>"), 553, "5.1.3")
        expect(c.cmd(b"RCPT TO:<x\xe2\x80\xa8y@remote.test>"), 554, "5.7.1")
        expect(c.cmd(b"RCPT TO:<alice@example.test>"), 250, "2.1.5")
        assert c.cmd(b"DATA").code == 354
        c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        expect(c.reply(), 250, "2.0.0")
    assert_clean_log(caplog)
    received = [r.getMessage() for r in caplog.records if "received from=" in r.getMessage()]
    assert len(received) == 1
    assert "helo=evil\\x1b[2J\\x07.test\\xff" in received[0]
    assert "from=<\\u202eevil@x.test>" in received[0]
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused RCPT")]
    assert any("\\u2028" in line for line in refused)  # every refused RCPT is logged now (issue 12)
