"""Which queue entries a ``monomail queue`` command is about, and an entry as JSON.

Job: `Selection` is what the admin asked for — queue ids and/or filters (``--all``,
``--sender``, ``--recipient``, ``--domain``, ``--older-than``) — and `Selection.matches`
decides one entry: it must be one of the ids (when ids are given) and pass every filter
given (the filters combine with AND). ``--sender`` compares the envelope sender (``<>``
or an empty value: the null sender), ``--recipient`` and ``--domain`` the recipients not
yet delivered (addresses and domains case-insensitively), ``--older-than`` the time
since the message was received. `as_json` is one entry as ``monomail queue list --json``
prints it (one object a line, as Postfix's ``postqueue -j``).

Pure: no I/O, the time handed in. Not here: reading the spool or changing it (``queuecmd``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .envelope import Status
from .record import QueuedRecipient, QueueEntry


def _address(text: str) -> str:
    """An address as given on the command line: ``<a@b>`` or ``a@b``; ``<>`` is ""."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.lower()


@dataclass(frozen=True, slots=True)
class Selection:
    ids: tuple[str, ...] = ()
    all: bool = False
    sender: str | None = None
    recipient: str | None = None
    domain: str | None = None
    older_than: float | None = None  # seconds

    @property
    def filtered(self) -> bool:
        """A filter was given (not just ids)."""
        return self.all or any(v is not None for v in (self.sender, self.recipient, self.domain, self.older_than))

    @property
    def empty(self) -> bool:
        """Neither an id nor a filter: nothing was asked for."""
        return not self.ids and not self.filtered

    def matches(self, entry: QueueEntry, now: float) -> bool:
        if self.empty:
            return False
        if self.ids and entry.id not in self.ids:
            return False
        if self.sender is not None and entry.sender.lower() != _address(self.sender):
            return False
        pending = [r.address.lower() for r in entry.recipients if r.state is not Status.DELIVERED]
        if self.recipient is not None and _address(self.recipient) not in pending:
            return False
        if self.domain is not None:
            domain = self.domain.strip().lower().removeprefix("@").rstrip(".")
            if not any(a.rpartition("@")[2] == domain for a in pending):
                return False
        return self.older_than is None or now - entry.received_at > self.older_than


def _recipient_json(r: QueuedRecipient) -> dict[str, Any]:
    out: dict[str, Any] = {"address": r.address, "state": r.state.value, "attempts": r.attempts}
    if r.next_attempt is not None:
        out["next_attempt"] = r.next_attempt
    if r.reply is not None:
        out["reply"] = str(r.reply)
    if r.cause:
        out["cause"] = r.cause
    if r.remote_host:
        out["remote_host"] = r.remote_host
    if r.gave_up:
        out["gave_up"] = True
    return out


def as_json(entry: QueueEntry, size: int) -> dict[str, Any]:
    """One entry for ``queue list --json``: id, sender ("" for <>), received_at (unix
    time), size, held, and each recipient with its state, attempts, last reply, cause,
    remote host and next attempt (unix time)."""
    return {"queue_id": entry.id, "sender": entry.sender, "received_at": entry.received_at, "size": size,
            "held": entry.hold, "recipients": [_recipient_json(r) for r in entry.recipients]}
