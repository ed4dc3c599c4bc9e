"""Reading an SMTP client's stream: command lines, and message content in pieces.

Job: what the SMTP face (``server``) reads from a connection's ``asyncio.StreamReader``:
one command (or AUTH response) line up to LF, a line longer than the reader's limit
skipped to its end (so that its rest is not taken for the next line); after 354 the
content in pieces up to each ``.<CR><LF>`` (or a buffer's worth), each handed to a
``message.Content`` as it comes, until the end-of-data line. The end of data is a line
holding just ``.``, i.e. ``<CR><LF>.<CR><LF>``: a bare LF or CR before the dot does not
end it (SMTP smuggling). Nothing proportional to a message's size runs in one piece
(DESIGN invariant 9): after `YIELD_EVERY` pieces the loop lets other sessions in.

Not here: deadlines and what the lines mean (``server``, ``transaction``).
"""

from __future__ import annotations

import asyncio

from .message import Content

END_LINE = b".\r\n"
YIELD_EVERY = 256  # content pieces read without a pause for other sessions at most


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One line up to LF; None for one longer than the reader's limit, skipped to its end."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as exc:
        await reader.read(exc.consumed)
    while True:
        try:
            await reader.readuntil(b"\n")
            return None
        except asyncio.LimitOverrunError as more:
            await reader.read(more.consumed)


async def read_pieces(reader: asyncio.StreamReader, content: Content) -> None:
    """Content pieces up to each ``.<CR><LF>`` (or a buffer's worth) until the end line."""
    tail = b"\r\n"  # the content begins at the start of a line
    pieces = 0
    while True:
        try:
            piece = await reader.readuntil(END_LINE)
        except asyncio.LimitOverrunError as exc:  # no ".\r\n" in a buffer's worth
            piece = await reader.read(exc.consumed)
        else:
            before = piece[-5:-3] if len(piece) >= 5 else (tail + piece[:-3])[-2:]
            if before == b"\r\n":  # CRLF . CRLF: the end (that CRLF ends the last line)
                content.feed(piece[:-3])
                break
        content.feed(piece)
        tail = piece[-2:]
        pieces += 1
        if pieces % YIELD_EVERY == 0:
            await asyncio.sleep(0)  # many short pieces: let the other sessions in
