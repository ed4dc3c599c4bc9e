"""``monomail sendmail -bs``: SMTP on standard input and output, on the server's own core.

Job: the stdio glue of the SMTP transaction core (``transaction``), as Postfix's
sendmail runs smtpd there (PHP's and Symfony's mailers use it). Every command is decided
by the same `Transaction` as ``monomail serve`` decides it, so both faces answer alike.
Recipients are checked at RCPT time with the server's policy (a trusted, local client:
unknown users 550 5.1.1; an error nobody classified leaves the decision to the server
at delivery time). After DATA the message is completed like any local submission
(``compose.prepare``) and goes the usual way (``handover``: the running server, else
the spool); the reply says how that went.

The differences from the network face are those of a local submission: the core's
``strict=False`` (lines may end in a bare LF, and long message lines are broken rather
than refused), and the local sender rule (``policy.local_sender``: MAIL FROM the
caller's own address or ``<>`` unless the caller is trusted, else 553 5.7.1, as on the
server's local socket). The exit status is 0 unless the session itself failed.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import BinaryIO

from .. import policy
from ..control import running_server
from ..errors import LOCAL_ERROR, Failure, Reply, reply_for
from ..record import parse_reply
from ..settings import Config
from ..sysexits import EX_OK
from ..tables import FileTables
from ..transaction import Message, Next, Step, Transaction, wire
from .compose import envelope_sender, login, normalize, prepare
from .handover import check_local, describe, server_uid, submit
from .options import Options

IDENT = "ESMTP monomail sendmail"
MAX_COMMAND = 1003  # longer command lines are skipped and refused (as serve does)
CHUNK = 64 * 1024
TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")

log = logging.getLogger("monomail.sendmail")


class StdioSMTP:
    """One ``-bs`` session on a pair of binary streams."""

    def __init__(self, config: Config, opts: Options, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self.config = config
        self.opts = opts
        self.rfile = rfile
        self.wfile = wfile
        self.tables = FileTables(config.local)
        self.login, self.gecos = login()
        self.server = running_server(config)
        trusted = policy.trusted_user(os.getuid(), self.login, config, server_uid(config, self.server))
        self.core = Transaction(config, functools.partial(check_local, config, self.tables), strict=False,
                                local_sender=lambda s: policy.local_sender(s, self.login, trusted, config))

    def send(self, replies: tuple[Reply, ...]) -> None:
        self.wfile.write(wire(replies))
        self.wfile.flush()

    def run(self) -> int:
        self.send((self.core.greeting(IDENT),))
        while True:
            line = self.rfile.readline(MAX_COMMAND)
            if not line:
                return EX_OK  # the client went away
            if len(line) == MAX_COMMAND and not line.endswith(b"\n"):
                while (more := self.rfile.readline(CHUNK)) and not more.endswith(b"\n"):
                    pass
                step = self.core.overlong()
            else:
                try:
                    step = self.core.receive(line)
                except Exception as exc:  # nobody classified it: temporary, as serve answers
                    log.error("internal error in the -bs session: %r", exc)
                    step = Step((LOCAL_ERROR,))
            self.wfile.write(step.wire)
            self.wfile.flush()
            if step.next is Next.CONTENT:
                if not self._read_content():
                    return EX_OK  # the client went away in DATA: nothing was accepted
                step = self.core.answer(self._finish())
                self.wfile.write(step.wire)
                self.wfile.flush()
            if step.next is Next.CLOSE:
                return EX_OK

    def _read_content(self) -> bool:
        content = self.core.content
        assert content is not None
        at_line_start = True
        while True:
            chunk = self.rfile.readline(CHUNK)
            if not chunk:
                return False
            if at_line_start and chunk.rstrip(b"\r\n") == b".":
                return True
            content.feed(chunk)
            at_line_start = chunk.endswith(b"\n")

    def _finish(self) -> Reply:
        result = self.core.end_data()
        if isinstance(result, Reply):
            return result
        try:
            return self._hand_over(result)
        except Exception as exc:  # nobody classified it: temporary, as serve answers
            log.error("internal error after DATA: %r", exc)
            return LOCAL_ERROR

    def _hand_over(self, msg: Message) -> Reply:
        primary = self.config.local.primary_domain
        sender = msg.sender
        prepared = prepare(normalize(msg.content.join()),
                           from_address=sender or envelope_sender(None, self.login, primary),
                           full_name=self.gecos if self.opts.full_name is None else self.opts.full_name,
                           hostname=self.config.hostname, extract=False, domain=primary)
        try:
            result = submit(self.config, sender, list(msg.recipients), prepared.data, uid=os.getuid(),
                            server=self.server)
        except Failure as exc:  # temporary: the spool cannot be written
            log.info("not accepted: %s", exc.message)
            reply = reply_for(exc.__cause__ or exc)
            return Reply(reply.code, reply.status, "Local error: message not accepted, try again later")
        if not result.sent and not result.queued:
            first = next(iter(result.refused.values()), str(TRANSACTION_FAILED))
            reply = parse_reply(first)  # the server's (or the policy's) own reply, as text
            return reply if reply.permanent else TRANSACTION_FAILED
        how = ("left for the server" if result.dropped else f"queued as {result.queue_id}") if result.queued \
            else "sent"
        if result.refused:
            how += "; refused: " + describe(result.refused)
        return Reply(250, "2.0.0", f"Ok: {how}")

