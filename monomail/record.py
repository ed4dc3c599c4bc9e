"""A queue entry's record: its typed form and its JSON, the one place that knows both.

Job: `QueueEntry` (the envelope and each recipient's state, `QueuedRecipient`) and the
bytes of its record, `encode` and `decode`: JSON exists only here. The record is human
readable, as chasquid keeps it, rewritten whole on every change (indented JSON,
format 2)::

    {"format": 2, "id": "...", "sender": "alice@example.test", "received_at": 1764339000.0,
     "smtputf8": false, "size": 2048, "hold": false, "warned": false,
     "recipients": [
      {"address": "bob@remote.test", "state": "deferred", "attempts": 2,
       "next_attempt": 1764339600.0,
       "reply": {"code": 451, "status": "4.4.1", "text": "connect to 127.0.0.3:25: connection refused"},
       "cause": "remote 127.0.0.3: ...", "remote_host": "mx1.remote.test",
       "finished": ["remote:bob@remote.test"], "gave_up": false}]}

``state`` is the vocabulary of `envelope.Status` (delivered / deferred / failed), the
words the mail log and ``monomail queue`` use too. ``reply`` is the last reply (code,
enhanced status, text); ``cause`` the last attempt's cause (``Outcome.detail``, for the
admin only); ``remote_host`` the host that gave the reply. Records of the release before
(no ``format``; ``"state": "pending"``; ``"last_error": "450 4.2.0 ..."`` as one string)
are read as well; unknown keys are ignored, so an admin may edit. A record that does not
parse or makes no sense (truncated, garbage, no recipients) raises `CorruptEntry`.

Pure: no I/O. Not here: where records live and how they are written (``spool``), what
the states mean or when to retry (``queue``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .envelope import Envelope, Status
from .errors import CorruptEntry, Reply

FORMAT = 2
_STATES = {"pending": Status.TEMPORARY, **{s.value: s for s in Status}}  # "pending": the release before
_LEGACY_REPLY = re.compile(r"([2-5]\d\d)(?: ([245]\.\d{1,3}\.\d{1,3}))?(?: (.*))?\Z", re.DOTALL)


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """One recipient of a queued message and what has happened to it so far."""

    address: str
    state: Status = Status.TEMPORARY  # TEMPORARY: still to be tried ("deferred")
    attempts: int = 0
    next_attempt: float | None = None  # unix time, for a deferred recipient
    reply: Reply | None = None  # the last reply (a remote MTA's or our own)
    cause: str = ""  # the last attempt's cause, for the admin (never sent to clients)
    remote_host: str = ""  # the host that gave ``reply``
    finished: tuple[str, ...] = ()  # destination keys already delivered (skipped on retry)
    gave_up: bool = False  # failed because the message grew too old

    @property
    def deferred(self) -> bool:
        """Still to be tried."""
        return self.state is Status.TEMPORARY


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One queued message: its envelope and its recipients' states."""

    id: str
    sender: str
    received_at: float
    recipients: tuple[QueuedRecipient, ...]
    smtputf8: bool = False
    size: int = 0
    hold: bool = False
    warned: bool = False

    @property
    def envelope(self) -> Envelope:
        return Envelope(self.id, self.sender, tuple(r.address for r in self.recipients), self.received_at,
                        self.smtputf8, self.size)

    @property
    def deferred(self) -> tuple[QueuedRecipient, ...]:
        """The recipients still to be tried."""
        return tuple(r for r in self.recipients if r.deferred)

    def due(self) -> float | None:
        """When the entry next needs work, or None (held, or nothing deferred)."""
        if self.hold:
            return None
        times = [r.next_attempt or 0.0 for r in self.deferred]
        return min(times) if times else None

    def updated(self, changed: Mapping[str, QueuedRecipient]) -> QueueEntry:
        """This entry with the recipients in ``changed`` (by address) replaced."""
        return replace(self, recipients=tuple(changed.get(r.address, r) for r in self.recipients))


def new_entry(env: Envelope, due: float) -> QueueEntry:
    """A queue entry for ``env`` with every recipient deferred, due at ``due``."""
    return QueueEntry(env.id, env.sender, env.received_at,
                      tuple(QueuedRecipient(r, next_attempt=due) for r in env.recipients),
                      env.smtputf8, env.size)


def encode(entry: QueueEntry) -> bytes:
    """The record of ``entry``, as indented JSON."""
    record = {
        "format": FORMAT,
        "id": entry.id,
        "sender": entry.sender,
        "received_at": entry.received_at,
        "smtputf8": entry.smtputf8,
        "size": entry.size,
        "hold": entry.hold,
        "warned": entry.warned,
        "recipients": [_encode_recipient(r) for r in entry.recipients],
    }
    return json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"


def _encode_recipient(r: QueuedRecipient) -> dict[str, Any]:
    out: dict[str, Any] = {"address": r.address, "state": r.state.value, "attempts": r.attempts}
    if r.next_attempt is not None:
        out["next_attempt"] = r.next_attempt
    if r.reply is not None:
        out["reply"] = {"code": r.reply.code, "status": r.reply.status, "text": r.reply.text}
    out.update(cause=r.cause, remote_host=r.remote_host, finished=list(r.finished), gave_up=r.gave_up)
    return out


def decode(qid: str, raw: bytes) -> QueueEntry:
    """The entry a record holds. Raises `CorruptEntry` for anything that does not parse
    or does not make sense (this format, or the release before's)."""
    try:
        record = json.loads(raw.decode("utf-8", "surrogateescape"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        fmt = record.get("format", 1)
        if fmt not in (1, FORMAT):
            raise ValueError(f"unknown format {fmt!r}")
        if _get(record, "id", str) != qid:
            raise ValueError(f"its id is {record.get('id')!r}")
        recipients = record.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise ValueError("no recipients")
        return QueueEntry(
            id=qid,
            sender=_get(record, "sender", str),
            received_at=float(_get(record, "received_at", (int, float))),
            recipients=tuple(_decode_recipient(r) for r in recipients),
            smtputf8=_get(record, "smtputf8", bool, False),
            size=_get(record, "size", int, 0),
            hold=_get(record, "hold", bool, False),
            warned=_get(record, "warned", bool, False),
        )
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptEntry(qid, f"queue entry {qid} is damaged: {exc}") from None


_MISSING: Any = object()


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = obj.get(key, default)
    if value is _MISSING:
        raise ValueError(f"no {key!r}")
    if value is default and default is not _MISSING:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"{key!r} is {value!r}")
    return value


def _decode_recipient(r: Any) -> QueuedRecipient:
    if not isinstance(r, dict):
        raise ValueError(f"recipient {r!r} is not a JSON object")
    state = _STATES.get(_get(r, "state", str))
    if state is None:
        raise ValueError(f"recipient state {r['state']!r}")
    next_at = r.get("next_attempt")
    if next_at is not None:
        next_at = float(_get(r, "next_attempt", (int, float)))
    finished = _get(r, "finished", list, [])
    if not all(isinstance(f, str) for f in finished):
        raise ValueError(f"'finished' is {finished!r}")
    return QueuedRecipient(
        address=_get(r, "address", str),
        state=state,
        attempts=_get(r, "attempts", int, 0),
        next_attempt=next_at,
        reply=_decode_reply(r),
        cause=_get(r, "cause", str, ""),
        remote_host=_get(r, "remote_host", str, ""),
        finished=tuple(finished),
        gave_up=_get(r, "gave_up", bool, False),
    )


def _decode_reply(r: dict[str, Any]) -> Reply | None:
    reply = r.get("reply")
    if reply is not None:
        if not isinstance(reply, dict):
            raise ValueError(f"'reply' is {reply!r}")
        return Reply(_get(reply, "code", int), _get(reply, "status", str, ""), _get(reply, "text", str, ""))
    legacy = _get(r, "last_error", str, "")  # the release before: "450 4.2.0 Mailbox busy"
    return parse_reply(legacy) if legacy else None


def parse_reply(text: str) -> Reply:
    """A reply written as one line (``450 4.2.0 Mailbox busy``) as a `Reply`; text that is
    not one becomes the text of a ``451 4.0.0``."""
    m = _LEGACY_REPLY.match(text.strip())
    if m is None:
        return Reply(451, "4.0.0", text.strip())
    return Reply(int(m.group(1)), m.group(2) or "", m.group(3) or "")
