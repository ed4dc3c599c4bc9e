"""smtpread: command lines and the end of data, over input split anywhere (issue 13: the SMTP
face reads from its own buffer now, not from a StreamReader)."""

from __future__ import annotations

import random

from monomail.message import Content
from monomail.smtpread import INCOMPLETE, LINE_LIMIT, OVERLONG, EndOfData, LineReader


class Pieces(Content):
    """A `Content` that keeps what it is fed, to compare with the stream."""

    def __init__(self) -> None:
        super().__init__(10**9)
        self.fed: list[bytes] = []

    def feed(self, data: bytes) -> None:
        assert data, "an empty piece was fed"
        self.fed.append(data)
        super().feed(data)


def _expected(stream: bytes) -> tuple[bytes, bytes] | None:
    """The content and what follows the end line, straight from the definition: the content
    begins at the start of a line, and ends at the first CRLF . CRLF (its CRLF included)."""
    seen = b"\r\n" + stream
    i = seen.find(b"\r\n.\r\n")
    return None if i < 0 else (seen[2:i + 2], seen[i + 5:])


def test_the_end_of_data_is_found_however_the_input_is_split():
    rng = random.Random(13)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b".\r\n"]
    for _ in range(30000):
        stream = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        content = Pieces()
        reader = EndOfData(content)
        got, pos = None, 0
        while pos < len(stream):
            size = rng.randint(1, 5)
            rest = reader.feed(stream[pos:pos + size])
            pos += size
            if rest is not None:
                got = (b"".join(content.fed), rest + stream[pos:])
                break
        want = _expected(stream)
        assert got == want, stream
        if want is None:  # nothing lost: what was not fed is held for the next piece
            assert b"".join(content.fed) + reader.held == stream


def test_a_bare_lf_or_cr_before_the_dot_does_not_end_the_data():
    for stream in (b"a\n.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n.\r\n", b"a\r\n.\nb\r\n.\r\n"):
        content = Pieces()
        assert EndOfData(content).feed(stream) == b""
        assert b"".join(content.fed) == stream[:-3]


def test_the_end_line_first_is_an_empty_message_and_what_follows_is_kept():
    content = Pieces()
    assert EndOfData(content).feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert content.fed == []


def test_command_lines_and_an_overlong_one_skipped_to_its_end():
    lines = LineReader()
    buf = bytearray(b"EHLO a\r\nMAIL FROM:<x@y>\r\nRCPT")
    assert lines.take_line(buf) == b"EHLO a\r\n"
    assert lines.take_line(buf) == b"MAIL FROM:<x@y>\r\n"
    assert lines.take_line(buf) == INCOMPLETE and buf == bytearray(b"RCPT")
    buf += b"x" * (LINE_LIMIT + 10)
    assert lines.take_line(buf) == INCOMPLETE and not buf  # dropped as it comes
    buf += b"y" * 5000
    assert lines.take_line(buf) == INCOMPLETE and not buf
    buf += b"zz\r\nNOOP\r\n"
    assert lines.take_line(buf) is OVERLONG
    assert lines.take_line(buf) == b"NOOP\r\n"


def test_a_line_at_the_limit_is_whole_and_one_past_it_is_overlong():
    lines = LineReader()
    at = b"x" * LINE_LIMIT + b"\n"
    assert lines.take_line(bytearray(at)) == at
    assert lines.take_line(bytearray(b"x" * (LINE_LIMIT + 1) + b"\n")) is OVERLONG
