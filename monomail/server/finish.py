"""The end of DATA: from a session's complete message to the reply the client gets.

Job: the core says the content is complete (`transaction.Transaction.end_data`: the
`Message`, or its refusal); the message gets our Received header (and, submitted by a
mail client or a local user, the Date and Message-ID it lacks: ``message.completion_fields``),
is checked if it came from outside (``inbound``: SPF, DKIM, DMARC, in a worker thread:
the Authentication-Results field, or ``550 5.7.1`` for a DMARC failure under
``p=reject`` with ``checks.dmarc = "enforce"``), loses any Authentication-Results
claiming our hostname if it was submitted, is logged as received, and goes to
``queue.accept``, whose reply is the answer to DATA (the 250 is the queue's promise).

Not here: reading the content (``session``), delivery (``queue``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .. import inbound, maillog
from ..envelope import Envelope, new_id
from ..errors import LOCAL_ERROR, Reply
from ..localpeer import received_local
from ..message import completion_fields, received_header
from ..transaction import Message, Transaction
from .host import Peer

log = logging.getLogger("monomail.smtp")
JOIN_IN_THREAD = 256 * 1024  # content larger than this is joined in a worker thread


async def finish_message(session: Peer, core: Transaction) -> Reply:
    """The reply for the end of DATA; an unclassified error is temporary (451 4.3.0)."""
    try:
        result = core.end_data()
        if isinstance(result, Reply):
            log.info("refused DATA from [%s]: %s", session.peer_ip, result)
            return result
        return await _accept(session, result)
    except Exception as exc:  # nobody classified it: temporary
        log.error("internal error after DATA from [%s]: %r", session.peer_ip, exc, exc_info=exc)
        return LOCAL_ERROR


async def _accept(session: Peer, msg: Message) -> Reply:
    cfg = session.cfg
    now = time.time()
    qid = new_id(now)
    rcpts = msg.recipients
    one = rcpts[0] if len(rcpts) == 1 else None
    local = session.local
    if local is not None:
        header = received_local(local, helo=msg.helo, hostname=cfg.hostname, protocol=msg.protocol,
                                queue_id=qid, recipient=one, when=now)
    else:
        header = received_header(helo=msg.helo, peer_ip=session.peer_ip, hostname=cfg.hostname,
                                 protocol=msg.protocol, queue_id=qid, recipient=one, when=now, tls=msg.tls)
    submitted = msg.login is not None or local is not None
    if submitted:  # by a mail client or a local user: complete what it left out
        header += completion_fields(msg.content.header, sender=msg.sender, hostname=cfg.hostname,
                                    queue_id=qid, when=now)
    if msg.content.size > JOIN_IN_THREAD:
        data = await asyncio.to_thread(msg.content.join, header)
    else:
        data = msg.content.join(header)
    if session.kind == "mx" and not session.trusted and msg.login is None:  # from outside: checked
        verdict = await inbound.check(data, client_ip=session.peer_ip, helo=msg.helo, sender=msg.sender,
                                      config=cfg, resolver=session.mm.resolver)
        if verdict.reply is not None:
            log.info("%s: refused DATA from [%s] from=<%s>: %s", qid, session.peer_ip,
                     maillog.printable(msg.sender), maillog.printable(verdict.summary))
            return verdict.reply
        log.log(logging.INFO if verdict.action == inbound.QUARANTINE or verdict.removed else logging.DEBUG,
                "%s: checked client=[%s] action=%s: %s", qid, session.peer_ip, verdict.action,
                maillog.printable(verdict.summary))
        data = verdict.message
    elif submitted:  # not checked, but results claiming our name go
        data, removed = inbound.without_our_results(data, cfg.hostname)
        if removed:
            log.info("%s: submitted by %s: removed %d Authentication-Results claiming our name",
                     qid, maillog.printable(msg.login or session.peer_ip), removed)
    env = Envelope(qid, msg.sender, rcpts, now, msg.smtputf8, len(data))
    user = msg.login or (local.name if local else None)
    maillog.received(env, client=session.peer_ip, helo=msg.helo, tls=msg.tls, user=user, data=data)
    return await session.mm.queue.accept(env, data)
