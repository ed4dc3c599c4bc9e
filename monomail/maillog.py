"""The mail log: one line per mail event, keyed by queue id.

Job: the only place that formats mail events, so an admin can grep one queue id and
see its whole story (received, delivered, deferred, failed), Postfix-style::

    4f1c2a9e0b3d: received from=<a@x.test> size=2048 nrcpt=1 client=[127.0.0.1] helo=x.test
    4f1c2a9e0b3d: to=<alice@example.test> status=delivered (maildir /var/mail/alice)

Causes (exception text, paths) go here and never into SMTP replies (DESIGN invariant 6).
"""

from __future__ import annotations

import logging

from .envelope import Envelope, Outcome, Status

log = logging.getLogger("monomail.mail")


def received(env: Envelope, *, client: str, helo: str) -> None:
    log.info(
        "%s: received from=<%s> size=%d nrcpt=%d client=[%s] helo=%s",
        env.id, env.sender, env.size, len(env.recipients), client, helo,
    )


def outcome(qid: str, o: Outcome, *, attempt: int = 1) -> None:
    level = logging.INFO if o.status is Status.DELIVERED else logging.WARNING
    log.log(level, "%s: to=<%s> status=%s attempt=%d reply=%s (%s)",
            qid, o.recipient, o.status.value, attempt, o.reply, o.detail)


def queued(qid: str, deferred: int, next_in: float) -> None:
    log.info("%s: queued deferred=%d next_attempt_in=%.0fs", qid, deferred, next_in)


def removed(qid: str, why: str) -> None:
    log.info("%s: removed (%s)", qid, why)


def problem(qid: str, what: str) -> None:
    log.error("%s: %s", qid, what)
