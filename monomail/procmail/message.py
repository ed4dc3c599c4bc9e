"""The message as procmail sees it: where the header ends, the From_ line, the closing empty line.

Job: three pure functions on the message bytes (LF line endings, a ``From`` line
first, as the engine holds it): `layout` finds where the body starts and which
newlines continue a header field (procmail's ``readmail``: the header ends at the
first empty line), `skip_from` drops the From_ line (mbox and Maildir writes and
forwards leave it off), `terminate` makes the text end with an empty line (what
procmail writes to programs and forwards).

Not here: the condition areas and ``h``/``b`` parts built from the layout (the
engine's state), writing anything. This module imports nothing of ours.
"""

from __future__ import annotations


def layout(mail: bytes) -> tuple[int, tuple[int, ...]]:
    """Where the body starts, and the newlines that continue header fields (procmail's
    readmail: the header ends at the first empty line)."""
    n = len(mail)
    p = 0
    while p < n and mail[p] == 10:
        p += 1
    p = min(p + 1, n)
    continued: list[int] = []
    while True:
        q = mail.find(b"\n", p)
        if q < 0:
            return n, tuple(continued)
        nxt = mail[q + 1:q + 2]
        if nxt in (b" ", b"\t"):
            continued.append(q)
        elif nxt == b"\n":
            return q + 2, tuple(continued)
        p = q + 1


def skip_from(data: bytes) -> bytes:
    """``data`` without its first line if that is a From_ line."""
    if not data.startswith(b"From "):
        return data
    nl = data.find(b"\n")
    return b"" if nl < 0 else data[nl + 1:]


def terminate(data: bytes) -> bytes:
    """What procmail writes to programs and forwards: the text ends with an empty line."""
    return data if data.endswith(b"\n\n") else data + b"\n"

