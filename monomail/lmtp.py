"""LMTP delivery (RFC 2033): hand one message to a mail store such as Dovecot's ``lmtp``.

Job: for one message and one LMTP target (a UNIX socket, or host and port) run one
transaction carrying all of the message's recipients for that target, and return one
`LmtpResult` per recipient: LHLO, STARTTLS when a TCP peer offers it (opportunistic, as
``remote.tls`` says: certificates not verified; ``"none"``: never; ``"required"``: a
TCP peer without STARTTLS fails temporarily), MAIL FROM, one RCPT TO per recipient,
DATA, and then one reply per recipient RCPT accepted, in RCPT order (RFC 2033 §4.2).
8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531) parameters are sent when the peer offers
them. A UTF-8 envelope sender to a store that does not offer SMTPUTF8 fails for good,
554 5.6.7, as Postfix does (RFC 6531 §3.4; Dovecot 2.3 offers no SMTPUTF8, and given
such a sender anyway it writes ``Return-Path: <>``, losing it). Replies are
multiline-aware; the enhanced status code (RFC 2034) is taken from the peer's text or
derived from the basic code.

`encode` turns a message into its DATA form (CRLF line ends, dot-stuffing, the final
``.``); it is a whole-message pass, so ``deliver`` runs it in a worker thread.

Not here: which recipients go by LMTP (``router``), the headers Dovecot adds itself
(``Return-Path`` from MAIL FROM, ``Received``, and ``Delivered-To`` when a transaction has
one recipient: monomail adds none of them to what it hands over), retries and bounces
(``queue``).

Error handling: nothing raises to the caller (but cancellation). A refused or timed
out connection, a dropped one, a TLS failure, a reply that does not parse and a 4xx
are temporary (451/4xx) for every recipient not yet answered; a 5xx is permanent for
the recipient it answers (for all of them when it answers MAIL or DATA; a 5xx greeting
or LHLO reply is the store's configuration, not a verdict on the message: temporary). The
reply's text names the target and what it said (``lmtp 192.0.2.7:24 said: 552 5.2.2
<bob@example.test> Quota exceeded``; a UNIX socket is "the LMTP store", its path only
in the result's ``detail``, for the log) and is about the peer only, so it can go into
the queue, the log and a bounce. A connection lost after the final ``.`` is
temporary for the recipients whose reply had not come (at-least-once).

Timeouts: ``remote.connect_timeout`` to connect and get the greeting,
``remote.command_timeout`` per command, ``remote.data_timeout`` for sending the
message and waiting for all of its replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import Reply
from .settings import LMTPTarget, RemoteConfig

log = logging.getLogger("monomail.lmtp")

MAX_LINE = 8192  # a reply line longer than this is a broken peer
_CODE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)\Z", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENHANCED = re.compile(r"\A[245]\.[0-9]{1,3}\.[0-9]{1,3} ")


@dataclass(frozen=True, slots=True)
class LmtpResult:
    recipient: str
    reply: Reply
    detail: str = ""  # for the log: the target (a socket's path too) and the reply


class _Failed(Exception):
    """The session cannot go on; ``reply`` is for every recipient not yet answered."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def encode(data: bytes) -> bytes:
    """``data`` (LF or CRLF line ends) as DATA sends it: CRLF, leading dots doubled, ``.``."""
    text = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _peer_reply(code: int, text: str) -> Reply:
    """The peer's reply as a Reply: its enhanced code from its text, or derived."""
    text = " ".join(_CONTROL.sub(" ", text).split())[:400]
    first, _, rest = text.partition(" ")
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(code)[0]:
        return Reply(code, first, rest)
    return Reply(code, {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0"), text)


class _Session:
    def __init__(self, target: LMTPTarget, rc: RemoteConfig) -> None:
        self.target = target
        # what replies call the peer: host and port, never a local socket path (DESIGN 6)
        self.where = f"lmtp {target}" if target.path is None else "the LMTP store"
        self.rc = rc
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.extensions: set[str] = set()

    async def connect(self, hostname: str) -> None:
        t = self.target
        try:
            async with asyncio.timeout(self.rc.connect_timeout):
                if t.path is not None:
                    self.reader, self.writer = await asyncio.open_unix_connection(str(t.path), limit=MAX_LINE)
                else:
                    self.reader, self.writer = await asyncio.open_connection(t.host, t.port, limit=MAX_LINE)
        except TimeoutError:
            raise _Failed(Reply(451, "4.4.1", f"connect to {self.where}: timeout after "
                                               f"{self.rc.connect_timeout:g}s")) from None
        except OSError as exc:
            raise _Failed(Reply(451, "4.4.1", f"connect to {self.where}: {_os_reason(exc)}")) from None
        greeting = await self.reply("the greeting", self.rc.connect_timeout)
        self.expect(greeting, 220, "the greeting", verdict=False)
        await self.lhlo(hostname)
        if t.path is None and self.rc.tls != "none":
            if "STARTTLS" in self.extensions:
                await self.starttls(hostname)
            elif self.rc.tls == "required":
                raise _Failed(Reply(451, "4.7.4", f"{self.where} offers no STARTTLS (remote.tls = \"required\")"))

    async def lhlo(self, hostname: str) -> None:
        reply, lines = await self.command_lines(f"LHLO {hostname}", "LHLO")
        self.expect(reply, 250, "LHLO", verdict=False)
        self.extensions = {line.split(" ", 1)[0].upper() for line in lines[1:]}

    async def starttls(self, hostname: str) -> None:
        reply = await self.command("STARTTLS", "STARTTLS")
        if reply.code != 220 and self.rc.tls == "required":
            raise _Failed(Reply(451, "4.7.4", f"{self.where} refused STARTTLS: {reply} (remote.tls = \"required\")"))
        if reply.code != 220:  # opportunistic: go on in the clear
            log.info("lmtp %s refused STARTTLS (%s); going on without TLS", self.target, reply)
            return
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        assert self.writer is not None
        try:
            async with asyncio.timeout(self.rc.command_timeout):
                await self.writer.start_tls(context, server_hostname=self.target.host or None)
        except TimeoutError:
            raise _Failed(Reply(451, "4.7.5", f"{self.where}: TLS handshake timed out")) from None
        except (ssl.SSLError, OSError) as exc:
            raise _Failed(Reply(451, "4.7.5", f"{self.where}: TLS failed: {getattr(exc, 'reason', None) or exc}")) \
                from None
        obj = self.writer.get_extra_info("ssl_object")
        log.info("lmtp %s: TLS %s %s", self.target, obj.version() if obj else "?", obj.cipher()[0] if obj else "")
        await self.lhlo(hostname)  # RFC 3207 §4.2: forget what was said before TLS

    def expect(self, reply: Reply, code: int, doing: str, *, verdict: bool = True) -> None:
        """Go on only on ``code``. A 5xx to MAIL or DATA (a ``verdict`` on this message) is
        permanent; one to the greeting or LHLO says the store will not talk to us now (its
        configuration, not the message): temporary, 451 4.3.0."""
        if reply.code == code:
            return
        text = f"{self.where} said: {reply} (in reply to {doing})"
        if reply.code < 400:
            raise _Failed(Reply(451, "4.5.0", f"{self.where}: unexpected reply {reply} (in reply to {doing})"))
        if reply.code >= 500 and not verdict:
            raise _Failed(Reply(451, "4.3.0", text))
        raise _Failed(Reply(reply.code, reply.status, text))

    async def command(self, line: str, doing: str) -> Reply:
        reply, _ = await self.command_lines(line, doing)
        return reply

    async def command_lines(self, line: str, doing: str) -> tuple[Reply, list[str]]:
        await self.send(line.encode("utf-8") + b"\r\n", doing, self.rc.command_timeout)
        return await self.reply_lines(doing, self.rc.command_timeout)

    async def send(self, data: bytes, doing: str, timeout: float) -> None:
        assert self.writer is not None
        try:
            async with asyncio.timeout(timeout):
                self.writer.write(data)
                await self.writer.drain()
        except TimeoutError:
            raise _Failed(Reply(451, "4.4.2", f"{self.where}: timeout after {timeout:g}s sending {doing}")) from None
        except OSError as exc:
            raise _Failed(Reply(451, "4.4.2", f"{self.where}: {_os_reason(exc)} during {doing}")) from None

    async def reply(self, doing: str, timeout: float, limit: float | None = None) -> Reply:
        reply, _ = await self.reply_lines(doing, timeout, limit)
        return reply

    async def reply_lines(self, doing: str, timeout: float, limit: float | None = None) -> tuple[Reply, list[str]]:
        """One reply, multiline or not: the Reply and the text of each of its lines (``timeout``:
        the time left; ``limit``: the configured limit it is part of, for the text)."""
        assert self.reader is not None
        lines: list[str] = []
        code = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.reader.readline()
                    if not raw.endswith(b"\n"):
                        raise _Failed(Reply(451, "4.4.2", f"{self.where}: connection lost waiting for the reply "
                                                          f"to {doing}"))
                    m = _CODE.match(raw.rstrip(b"\r\n"))
                    if not m or (code and int(m.group(1)) != code):
                        raise _Failed(Reply(451, "4.5.0", f"{self.where}: a reply that does not parse "
                                                          f"(in reply to {doing})"))
                    code = int(m.group(1))
                    lines.append(m.group(3).decode("utf-8", "replace"))
                    if m.group(2) == b" ":
                        break
        except TimeoutError:
            raise _Failed(Reply(451, "4.4.2", f"{self.where}: timeout after {limit or timeout:g}s waiting for "
                                              f"the reply to {doing}")) from None
        except (ValueError, asyncio.LimitOverrunError):  # a line over MAX_LINE
            raise _Failed(Reply(451, "4.5.0", f"{self.where}: over-long reply line (in reply to {doing})")) from None
        except OSError as exc:
            raise _Failed(Reply(451, "4.4.2", f"{self.where}: {_os_reason(exc)} waiting for the reply "
                                              f"to {doing}")) from None
        if code < 300:
            return _peer_reply(code, lines[0]), lines
        # RFC 2034 §3: every line of a multiline reply repeats the enhanced code; say it once
        return _peer_reply(code, " ".join([lines[0], *(_ENHANCED.sub("", line, 1) for line in lines[1:])])), lines

    async def close(self, polite: bool) -> None:
        if self.writer is None:
            return
        with contextlib.suppress(Exception):
            if polite:
                async with asyncio.timeout(min(self.rc.command_timeout, 2.0)):
                    self.writer.write(b"QUIT\r\n")
                    await self.writer.drain()
                    await self.reader.readline() if self.reader else None
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


async def send(target: LMTPTarget, sender: str, recipients: Sequence[str], payload: bytes, *, hostname: str,
               remote: RemoteConfig, smtputf8: bool = False, eight_bit: bool = True) -> list[LmtpResult]:
    """Deliver ``payload`` (from `encode`) to ``recipients`` at ``target``: one result each."""
    session = _Session(target, remote)
    where = session.where
    answered: dict[str, LmtpResult] = {}
    polite = False
    try:
        await session.connect(hostname)
        params = ""
        if eight_bit and "8BITMIME" in session.extensions:
            params += " BODY=8BITMIME"
        if smtputf8:
            if "SMTPUTF8" not in session.extensions:  # as Postfix: never a UTF-8 address to a peer without it
                raise _Failed(Reply(554, "5.6.7", f"{where} does not offer SMTPUTF8, which this sender needs"))
            params += " SMTPUTF8"
        reply = await session.command(f"MAIL FROM:<{sender}>{params}", "MAIL FROM")
        session.expect(reply, 250, "MAIL FROM")
        accepted: list[str] = []
        for rcpt in recipients:
            reply = await session.command(f"RCPT TO:<{rcpt}>", f"RCPT TO:<{rcpt}>")
            if reply.code == 250 or reply.code == 251:
                accepted.append(rcpt)
            elif reply.code == 421:
                session.expect(reply, 250, f"RCPT TO:<{rcpt}>")  # the session ends: all not answered
            else:
                answered[rcpt] = _refused(where, reply, f"RCPT TO:<{rcpt}>", rcpt)
        polite = True
        if accepted:
            await _data(session, accepted, payload, answered)
    except _Failed as exc:
        polite = False
        for rcpt in recipients:
            answered.setdefault(rcpt, LmtpResult(rcpt, exc.reply))
    finally:
        await session.close(polite)
    return [LmtpResult(r, answered[r].reply, f"lmtp {target}: {answered[r].reply}") for r in recipients]


async def _data(session: _Session, accepted: list[str], payload: bytes, answered: dict[str, LmtpResult]) -> None:
    """DATA, the message, then one reply per accepted recipient (RFC 2033 §4.2)."""
    where, remote = session.where, session.rc
    reply = await session.command("DATA", "DATA")
    session.expect(reply, 354, "DATA")
    await session.send(payload, "the message", remote.data_timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + remote.data_timeout
    for rcpt in accepted:  # RFC 2033 §4.2: one reply per accepted recipient, in order
        reply = await session.reply(f"the end of data for <{rcpt}>", max(deadline - loop.time(), 0.001),
                                    remote.data_timeout)
        if reply.code == 250:
            answered[rcpt] = LmtpResult(rcpt, reply, f"{where}: {reply}")
        else:
            answered[rcpt] = _refused(where, reply, "the end of data", rcpt)


def _refused(where: str, reply: Reply, doing: str, rcpt: str) -> LmtpResult:
    """A peer's "no" for one recipient (a 2xx/3xx where none belongs: temporary, 4.5.0)."""
    if reply.code < 400:
        reply = Reply(451, "4.5.0", f"unexpected reply {reply}")
    said = Reply(reply.code, reply.status, f"{where} said: {reply} (in reply to {doing})")
    return LmtpResult(rcpt, said, str(said))


def _os_reason(exc: OSError) -> str:
    """``connection refused``, ``no such file or directory``...: the socket's own words, lower case."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    reason = (os.strerror(exc.errno) if exc.errno else exc.strerror) or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]
