"""Reading an SMTP client's stream: command lines, and message content in pieces.

Job: the pure part of what the SMTP face (``server``) reads from a connection, over the
bytes as they arrive (a ``bytearray`` the face appends to): `take_line` takes one command
(or AUTH response) line up to LF, a line longer than `LINE_LIMIT` skipped to its end (so
that its rest is not taken for the next line); after 354 an `EndOfData` hands the content
to a ``message.Content`` as it comes, up to the end-of-data line. The end of data is a line
holding just ``.``, i.e. ``<CR><LF>.<CR><LF>``: a bare LF or CR before the dot does not end
it (SMTP smuggling). Nothing here is proportional to more than one piece of input (DESIGN
invariant 9): each call handles what one read brought.

Not here: deadlines, sockets and what the lines mean (``server``, ``transaction``).
"""

from __future__ import annotations

from .message import Content

LINE_LIMIT = 1001  # a command line's LF at most this far in (RFC 5321's 512, and room to say so)
END = b"\r\n.\r\n"
INCOMPLETE = b""  # `take_line`: no whole line in the buffer yet
OVERLONG = None  # `take_line`: a line longer than LINE_LIMIT was skipped


class LineReader:
    """Command lines out of a connection's buffer; an over-long line is dropped as it
    comes, so the buffer never holds more than `LINE_LIMIT` bytes of one."""

    __slots__ = ("skipping",)

    def __init__(self) -> None:
        self.skipping = False  # inside an over-long line: drop up to its LF

    def take_line(self, buf: bytearray) -> bytes | None:
        """One line with its LF (removed from ``buf``), `INCOMPLETE` (``b""``), or
        `OVERLONG` (None) once the end of a too-long line has been skipped."""
        i = buf.find(b"\n", 0, LINE_LIMIT + 1)
        if self.skipping:
            j = buf.find(b"\n")
            if j < 0:
                buf.clear()
                return INCOMPLETE
            del buf[:j + 1]
            self.skipping = False
            return OVERLONG
        if i < 0:
            if len(buf) > LINE_LIMIT:
                self.skipping = True
                return self.take_line(buf)
            return INCOMPLETE
        line = bytes(buf[:i + 1])
        del buf[:i + 1]
        return line


class EndOfData:
    """Feeds content to a `Content` up to the end-of-data line, piece by piece as read."""

    __slots__ = ("content", "tail", "held")

    def __init__(self, content: Content) -> None:
        self.content = content
        self.tail = b"\r\n"  # the last two octets fed: the content begins at the start of a line
        self.held = b""  # "." or ".\r" after a CRLF: perhaps the end line, not fed yet

    def feed(self, data: bytes) -> bytes | None:
        """Feed what was read; None while the end line has not come, else what follows it
        (the next commands of a pipelining client)."""
        s = self.held + data if self.held else data
        edge = (self.tail + s[:4]).find(END)  # an end line beginning in what was fed before
        if 0 <= edge <= 1:
            if edge:
                self.content.feed(s[:edge])
            return s[edge + 3:]
        i = s.find(END)
        if i >= 0:
            self.content.feed(s[:i + 2])  # that CRLF ends the last line
            return s[i + 5:]
        end = s[-4:] if len(s) >= 4 else (self.tail + s)[-4:]
        hold = min(len(s), 2 if end == b"\r\n.\r" else 1 if end[-3:] == b"\r\n." else 0)
        if hold:
            s, self.held = s[:-hold], s[-hold:]
        else:
            self.held = b""
        if s:
            self.content.feed(s)
            self.tail = s[-2:] if len(s) >= 2 else self.tail[-1:] + s
        return None
