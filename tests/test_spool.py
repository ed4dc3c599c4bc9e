"""The spool record: typed values in, human-readable JSON on disk, typed values out;
records written by the release before still read (and delivered by a real server)."""

from __future__ import annotations

import json
import mailbox
import time
from dataclasses import replace
from pathlib import Path

import pytest

from monomail.envelope import Status
from monomail.errors import CorruptEntry, Reply, SpoolError
from monomail.record import QueuedRecipient, QueueEntry, decode, encode, parse_reply
from monomail.spool import Spool

# A record exactly as the release before wrote it (queue.py's docstring format).
OLD_RECORD = """{
 "id": "6618ef8a568c26ff60000",
 "sender": "me@remote.test",
 "received_at": 1764339000.5,
 "smtputf8": false,
 "size": 52,
 "hold": false,
 "warned": false,
 "recipients": [
  {
   "address": "bob@example.test",
   "state": "pending",
   "attempts": 2,
   "next_attempt": 1764339600.0,
   "finished": [],
   "last_error": "450 4.2.0 Mailbox busy, try again later"
  },
  {
   "address": "alice@example.test",
   "state": "delivered",
   "attempts": 1,
   "finished": ["mailbox:alice"]
  },
  {
   "address": "x@remote.test",
   "state": "failed",
   "attempts": 5,
   "finished": [],
   "last_error": "451 4.4.1 No mail host answered, will retry",
   "remote_host": "mx1.remote.test",
   "gave_up": true
  }
 ]
}
"""
OLD_ID = "6618ef8a568c26ff60000"


def test_a_record_of_the_release_before_is_read():
    entry = decode(OLD_ID, OLD_RECORD.encode())
    bob, alice, x = entry.recipients
    assert (entry.id, entry.sender, entry.received_at, entry.size) == (OLD_ID, "me@remote.test", 1764339000.5, 52)
    assert bob == QueuedRecipient("bob@example.test", Status.TEMPORARY, 2, 1764339600.0,
                                  Reply(450, "4.2.0", "Mailbox busy, try again later"))
    assert alice.state is Status.DELIVERED and alice.finished == ("mailbox:alice",) and alice.reply is None
    assert x.state is Status.PERMANENT and x.gave_up and x.remote_host == "mx1.remote.test"
    assert x.reply == Reply(451, "4.4.1", "No mail host answered, will retry")
    assert entry.deferred == (bob,) and entry.due() == 1764339600.0


def test_round_trip_writes_one_vocabulary_and_structured_replies():
    entry = decode(OLD_ID, OLD_RECORD.encode())
    bob = replace(entry.recipients[0], cause="mbox /var/mail/bob: locked by another program")
    entry = entry.updated({bob.address: bob})
    raw = encode(entry)
    assert raw.startswith(b"{\n ") and raw.endswith(b"}\n")  # indented: for people too
    record = json.loads(raw)
    assert record["format"] == 2
    assert [r["state"] for r in record["recipients"]] == ["deferred", "delivered", "failed"]
    assert [s.value for s in Status] == ["delivered", "deferred", "failed"]  # the log's words, too
    assert record["recipients"][0]["reply"] == {"code": 450, "status": "4.2.0", "text": "Mailbox busy, try again later"}
    assert record["recipients"][0]["cause"] == "mbox /var/mail/bob: locked by another program"
    assert "last_error" not in raw.decode()
    assert decode(OLD_ID, raw) == entry


def test_the_server_delivers_an_entry_of_the_release_before(serve, tmp_path: Path):
    spool = tmp_path / "spool"
    spool.mkdir()
    record = json.loads(OLD_RECORD)
    record["recipients"] = record["recipients"][:1]  # bob, pending
    record["recipients"][0]["next_attempt"] = 0
    (spool / f"{OLD_ID}.msg").write_bytes(b"Subject: from the old release\n\nstill here\n")
    (spool / f"{OLD_ID}.json").write_text(json.dumps(record, indent=1))
    serve()
    deadline = time.monotonic() + 10
    while (spool / f"{OLD_ID}.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m["Subject"] for m in mailbox.mbox(tmp_path / "mail" / "bob")] == ["from the old release"]
    assert not (spool / f"{OLD_ID}.json").exists()


@pytest.mark.parametrize(("raw", "why"), [
    (b'{"id": "q1", "sender": "", "received_at": 1.0}', "no recipients"),
    (b'{"id": "q1", "sender": "", "received_at": 1.0, "recipients": [', "Expecting"),
    (b"\x00\x01 garbage", "Expecting value"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"id": "other", "sender": "", "received_at": 1.0, "recipients": [{"address": "a@b"}]}', "its id is"),
    (b'{"id": "q1", "sender": "", "received_at": 1.0, "recipients": [{"address": "a@b", "state": "odd"}]}',
     "state"),
    (b'{"id": "q1", "sender": "", "received_at": "yesterday", "recipients": [{"address": "a@b", "state": "pending"}]}',
     "received_at"),
    (b'{"id": "q1", "sender": 5, "received_at": 1.0, "recipients": [{"address": "a@b", "state": "pending"}]}',
     "sender"),
    (b'{"format": 9, "id": "q1"}', "unknown format"),
])
def test_damaged_records_raise_corrupt_entry_naming_the_entry(raw: bytes, why: str):
    with pytest.raises(CorruptEntry) as err:
        decode("q1", raw)
    assert err.value.qid == "q1" and "q1" in str(err.value) and why in str(err.value)


def test_journal_new_stores_every_recipient_deferred_and_due_now(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    env = spool.journal_new("a@example.test", ["b@remote.test", "ü@remote.test"], b"Subject: x\n\nbody\n", now=100.0)
    entry = spool.load(env.id)
    assert isinstance(entry, QueueEntry) and entry.envelope == env
    assert entry.smtputf8 and entry.size == len(b"Subject: x\n\nbody\n")
    assert [(r.state, r.next_attempt) for r in entry.recipients] == [(Status.TEMPORARY, 100.0)] * 2
    assert spool.message(env.id) == b"Subject: x\n\nbody\n"
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700


def test_a_record_without_its_message_is_damaged_and_moved_aside(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    env = spool.journal_new("", ["b@example.test"], b"x\n")
    (tmp_path / "spool" / f"{env.id}.msg").unlink()
    [(name, got)] = list(spool.scan())
    assert name == env.id and isinstance(got, CorruptEntry)
    with pytest.raises(CorruptEntry):
        spool.message(env.id)
    where = spool.quarantine(env.id, str(got))
    assert where == tmp_path / "spool" / "corrupt" and spool.ids() == []
    [damaged] = spool.damaged()
    assert damaged.name == env.id and "no message file" in damaged.reason
    with pytest.raises(SpoolError, match="no queue entry"):
        spool.load(env.id)


@pytest.mark.parametrize(("text", "reply"), [
    ("450 4.2.0 Mailbox busy", Reply(450, "4.2.0", "Mailbox busy")),
    ("554 Transaction failed", Reply(554, "", "Transaction failed")),
    ("something odd", Reply(451, "4.0.0", "something odd")),
])
def test_parse_reply(text: str, reply: Reply):
    assert parse_reply(text) == reply
