"""The SMTP transaction core: one set of decisions, and both SMTP faces answering alike.

The pure core is driven directly (no sockets, no sleeps); then one table of command
lines goes to ``monomail serve`` over a real socket and to ``monomail sendmail -bs`` as a
real subprocess, and every reply's code and enhanced status code must be the same
(issue 8, defect 8: ``SIZE=abc`` was 501 from serve and 555 from -bs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, write_config
from test_bad_input import Client

from monomail.config import load
from monomail.envelope import Address
from monomail.errors import RouteError
from monomail.message import Content
from monomail.router import UNKNOWN_USER
from monomail.transaction import (
    OUT_OF_SEQUENCE,
    STATELESS,
    TRANSITIONS,
    Message,
    Next,
    State,
    Transaction,
    wire,
)

# -- the pure core ------------------------------------------------------------------------


def core(tmp_path: Path, *, strict: bool = True, **overrides: Any) -> Transaction:
    config = load(write_config(tmp_path, **overrides))

    def check(address: Address, sender: str) -> None:
        if address.local == "nobody":
            raise RouteError(UNKNOWN_USER, f"no user {address}")

    return Transaction(config, check, strict=strict)


def say(t: Transaction, line: str | bytes) -> str:
    raw = line if isinstance(line, bytes) else line.encode()
    step = t.receive(raw + b"\r\n")
    return " ".join(str(step.replies[-1]).split()[:2])


def test_the_transition_table_is_whole():
    for state in State:
        assert state in TRANSITIONS
    for (state, verb), reply in OUT_OF_SEQUENCE.items():
        assert verb not in TRANSITIONS[state] and verb not in STATELESS
        assert (reply.code, reply.status) == (503, "5.5.1")


def test_a_transaction_through_the_core(tmp_path: Path):
    t = core(tmp_path, server={"max_recipients": 2})
    assert t.state is State.CONNECTED
    assert say(t, "MAIL FROM:<a@x.test>") == "503 5.5.1"
    assert say(t, "EHLO client.test").startswith("250") and t.state is State.READY
    assert say(t, "RCPT TO:<alice@example.test>") == "503 5.5.1"
    assert say(t, "MAIL FROM:<a@x.test> SIZE=100 BODY=8bitmime") == "250 2.1.0"
    assert t.state is State.SENDER
    assert say(t, "DATA") == "503 5.5.1"
    assert say(t, "RCPT TO:<nobody@example.test>") == "550 5.1.1" and t.state is State.SENDER
    assert say(t, "RCPT TO:<alice>") == "250 2.1.5" and t.recipients == ["alice@example.test"]
    assert say(t, "RCPT TO:<Alice@EXAMPLE.test>") == "250 2.1.5"
    assert say(t, "RCPT TO:<carol@example.test>") == "452 4.5.3"
    step = t.receive(b"DATA\r\n")
    assert step.next is Next.CONTENT and step.replies[0].code == 354 and t.state is State.DATA
    assert t.content is not None
    t.content.feed(b"Received: x\r\nSubject: hi\r\n\r\n..dot\r\n")
    msg = t.end_data()
    assert isinstance(msg, Message) and t.state is State.READY
    assert msg.recipients == ("alice@example.test", "Alice@example.test")
    assert (msg.sender, msg.protocol, msg.helo, msg.content.received) == ("a@x.test", "ESMTP", "client.test", 1)
    assert msg.content.join(b"R: top\n") == b"R: top\nReceived: x\nSubject: hi\n\n.dot\n"
    assert say(t, "QUIT") == "221 2.0.0" and t.state is State.CLOSED


@pytest.mark.parametrize("value, expected", [
    ("100", "250 2.1.0"), ("0" * 500 + "1", "250 2.1.0"), ("10241", "552 5.3.4"),
    ("abc", "501 5.5.4"), ("²", "501 5.5.4"), ("١٢٣", "501 5.5.4"), ("１２３", "501 5.5.4"), ("12a", "501 5.5.4"),
    ("-1", "501 5.5.4"), ("+1", "501 5.5.4"), ("1.5", "501 5.5.4"),
])
def test_size_is_ascii_digits_only(tmp_path: Path, value: str, expected: str):
    """Issue 8, defect 12: str.isdigit() took "²" (then int() raised) and Arabic-Indic or
    full-width digits (accepted)."""
    t = core(tmp_path, server={"max_message_size": 10240})
    say(t, "EHLO c.test")
    assert say(t, f"MAIL FROM:<a@x.test> SIZE={value}") == expected


def test_bad_parameter_values_are_501(tmp_path: Path):
    t = core(tmp_path)
    say(t, "EHLO c.test")
    assert say(t, b"MAIL FROM:<a@x.test> SIZE=\xff") == "501 5.5.4"
    assert say(t, b"MAIL FROM:<a@x.test> BODY=\xc3\x28") == "501 5.5.4"
    assert say(t, "MAIL FROM:<a@x.test> BODY=8BIT\u0085MIME") == "501 5.5.4"
    assert say(t, "MAIL FROM:<a@x.test> SIZE") == "501 5.5.4"
    assert say(t, "MAIL FROM:<a@x.test> FOO=1") == "555 5.5.4"
    assert say(t, b"MAIL FROM:<a\xc2\x85b@x.test> SMTPUTF8") == "553 5.1.3"  # a C1 control in the address


def test_command_line_rules(tmp_path: Path):
    t = core(tmp_path)
    assert say(t, "VRFY") == "501 5.5.4"
    assert say(t, b"VRFY \xff\xfe") == "252 2.5.2"
    assert say(t, "") == "500 5.5.2" and say(t, b"\xff") == "500 5.5.2"
    assert t.receive(b"NOOP\n").replies[0].status == "5.5.2"  # a bare LF on the network
    assert say(t, "NOOP " + "x" * 508) == "500 5.5.2"
    assert say(t, "EXPN list") == "502 5.5.1"
    lenient = core(tmp_path, strict=False)
    assert lenient.receive(b"NOOP\n").replies[0].code == 250  # -bs: a bare LF is fine
    for _ in range(4):
        assert say(t, "FOO") == "500 5.5.1"
    step = t.receive(b"FOO\r\n")
    assert (step.replies[0].code, step.next) == (421, Next.CLOSE)


def test_wire_format():
    from monomail.errors import Reply

    assert wire([Reply(250, "", "a"), Reply(250, "", "b")]) == b"250-a\r\n250 b\r\n"
    assert wire([Reply(354, "", "go")]) == b"354 go\r\n"


def _fed(data: bytes, size: int) -> Content:
    """A `Content` fed ``data`` in reads of ``size`` octets."""
    c = Content(10**7)
    for i in range(0, len(data), size):
        c.feed(data[i : i + size])
    return c


def test_content_is_checked_in_blocks():
    """Bare CR/LF, NUL and long lines are found wherever the reads happen to split."""
    good = b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n..\r\n" + b"z\r\n" * 40000
    for size in (1, 7, 1000, 65536, len(good)):
        c = _fed(good, size)
        c.finish()
        assert c.join() == good.replace(b"\r\n", b"\n").replace(b"\n..", b"\n.")
    for bad in (b"a\r\nb\nc\r\n", b"a\rb\r\n", b"a\r\n" * 30000 + b"\x00\r\n", b"a\r\n" + b"y" * 999 + b"\r\n",
                b"y" * 100000 + b"\r\n"):
        for size in (3, 65536):
            c = _fed(bad, size)
            with pytest.raises(Exception) as e:
                c.finish()
            assert e.value.reply.code == 554  # type: ignore[attr-defined]


# -- serve and sendmail -bs answer the same ---------------------------------------------

SAME_ANSWERS: list[bytes] = [
    b"MAIL FROM:<a@x.test>",
    b"NOOP",
    b"EHLO client.test",
    b"MAIL FROM:<a@x.test> SIZE=abc",
    b"MAIL FROM:<a@x.test> SIZE=\xc2\xb2",
    b"MAIL FROM:<a@x.test> SIZE=\xd9\xa1\xd9\xa2",
    b"MAIL FROM:<a@x.test> SIZE=\xef\xbc\x91",
    b"MAIL FROM:<a@x.test> SIZE=99999999",
    b"MAIL FROM:<a@x.test> SIZE",
    b"MAIL FROM:<a@x.test> SIZE=\xff",
    b"MAIL FROM:<a@x.test> BODY=BINARYMIME",
    b"MAIL FROM:<a@x.test> FOO=1",
    b"MAIL FROM:<a@x.test> SMTPUTF8=yes",
    b"MAIL FROM:<\xff@x.test>",
    b"MAIL FROM:<\xc3\xa9@x.test>",
    b"MAIL FROM:<a@x.test",
    b"MAIL FROM:",
    b"MAIL TO:<a@x.test>",
    b"RCPT TO:<alice@example.test>",
    b"DATA",
    b"VRFY",
    b"VRFY alice",
    b"VRFY \xff\xfe",
    b"EXPN team",
    b"HELP",
    b"HELP MAIL",
    b"HELP FOO",
    b"NOOP x",
    b"RSET x",
    b"QUIT x",
    b"",
    b"FOO",
    b"STARTTLS",
    b"AUTH PLAIN",
    b"NOOP \x00",
    b"NOOP a\rb",
    b"NOOP " + b"x" * 600,
    b"NOOP " + b"x" * 5000,
    b"MAIL FROM:<a@x.test> BODY=8BITMIME",
    b"MAIL FROM:<b@x.test>",
    b"RCPT TO:<>",
    b"RCPT TO:<alice@example.test> FOO=bar",
    b"RCPT TO:<nobody@example.test>",
    b"RCPT TO:<\xff@example.test>",
    b"RCPT TO:<alice>",
    b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<carol@example.test>",
    b"DATA x",
    b"DATA",
    b"Subject: the same\r\n\r\nbody\r\n.",
    b"RSET",
    b"HELO client.test",
    b"MAIL FROM:<> SIZE=1",
    b"QUIT",
]


def _codes(lines: list[str]) -> list[tuple[str, str]]:
    """(code, enhanced status or "") of each final reply line."""
    out = []
    for line in lines:
        if line[3:4] == " ":
            m = re.match(r"(\d{3}) ([245]\.\d{1,3}\.\d{1,3})?", line)
            assert m, line
            out.append((m.group(1), m.group(2) or ""))
    return out


def test_serve_and_sendmail_bs_answer_the_same(serve: Any, tmp_path: Path):
    server = serve(server={"max_recipients": 2, "max_message_size": 10000, "max_errors": 1000})
    via_serve = []
    with Client(server.port, greet=False) as c:
        via_serve.append(c._line().decode())
        for line in SAME_ANSWERS:
            c.send(line + b"\r\n")
            while True:
                text = c._line().decode("utf-8", "replace")
                via_serve.append(text)
                if text[3:4] == " ":
                    break
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOMAIL_CONFIG": str(tmp_path / "monomail.toml")}
    proc = subprocess.run([sys.executable, "-m", "monomail.sendmail", "-bs"], input=b"".join(
        line + b"\r\n" for line in SAME_ANSWERS), capture_output=True, timeout=30, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    via_bs = proc.stdout.decode("utf-8", "replace").split("\r\n")[:-1]
    served, bs = _codes(via_serve), _codes(via_bs)
    expected = len(SAME_ANSWERS) + 1  # one reply per line, and the greeting
    assert len(served) == expected and len(bs) == expected, (via_serve, via_bs)
    differ = [(line, a, b) for line, a, b in zip([b"(greeting)", *SAME_ANSWERS], served, bs, strict=True) if a != b]
    assert not differ, differ
    assert served[4] == ("501", "5.5.4")  # SIZE=abc: 501 from both (defect 8; -bs said 555)
    assert served[-1] == ("221", "2.0.0")
