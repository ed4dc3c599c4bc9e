"""Writing mail from ``monomail mail``: a reply or a new message, and handing it on.

Job: build the message (`compose`: From, To, Subject, Date, Message-ID and, for a
reply, In-Reply-To and References, RFC 5322 §3.6; a text/plain body, MIME as the
stdlib writes it), find whom a reply goes to (`reply_addresses`: Reply-To, else From,
else the envelope sender, RFC 5322 §3.6.2), and hand the result to a ``Submit``
hook. The default hook (`sendmail_submit`) runs ``python -m monomail sendmail -i --
ADDR...`` with the message on stdin, as mailx runs sendmail. If submission fails the
text is kept in ``$DEAD`` or ``~/dead.letter`` (`dead_letter`, an mbox). Not here:
reading what the user types (``session``), the SMTP submission itself (``submit``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path

from .. import mailstore
from ..errors import ReaderError
from ..mboxrewrite import DEFAULT_LOCK_TIMEOUT
from .messages import Message

Submit = Callable[[str, Sequence[str], bytes], None]
"""``submit(envelope_sender, recipients, message)``: hand one message on, or raise."""

SUBMIT_TIMEOUT = 120.0


def sendmail_submit(sender: str, recipients: Sequence[str], message: bytes, *, config: Path | None = None) -> None:
    """The default ``submit``: ``python -m monomail sendmail -i -- RCPT...``, message on
    stdin; ``config`` (the reader's own) is passed as ``$MONOMAIL_CONFIG``. The envelope
    sender is left to sendmail (the login name), as mailx does."""
    cmd = [sys.executable, "-m", "monomail", "sendmail", "-i", "--", *recipients]
    env = None if config is None else {**os.environ, "MONOMAIL_CONFIG": str(config)}
    try:
        proc = subprocess.run(cmd, input=message, capture_output=True, timeout=SUBMIT_TIMEOUT, check=False,
                              env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReaderError(f"monomail sendmail: {exc}") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ReaderError(f"monomail sendmail exited {proc.returncode}" + (f": {detail[-1]}" if detail else ""))


def compose(from_addr: str, to: Sequence[str], subject: str, body: str, *,
            in_reply_to: str = "", references: Sequence[str] = (), domain: str | None = None) -> bytes:
    msg = EmailMessage()
    if from_addr:
        msg["From"] = from_addr
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=domain)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = " ".join([*references, in_reply_to][-20:])
    msg.set_content(body)
    return msg.as_bytes()


def reply_addresses(m: Message) -> list[str]:
    for name in ("Reply-To", "From"):
        addrs = [a for _, a in getaddresses([m.header(name)]) if a]
        if addrs:
            return addrs
    return [m.envelope_sender] if m.envelope_sender else []


def dead_letter(message: bytes, sender: str) -> Path:
    """Append an unsent message to ``$DEAD`` (default ``~/dead.letter``); returns the path."""
    path = Path(os.environ.get("DEAD") or Path.home() / "dead.letter")
    mailstore.deliver_mbox(path, [(sender, time.time(), [mailstore.mbox_quote(message)])], DEFAULT_LOCK_TIMEOUT)
    return path
