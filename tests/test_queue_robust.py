"""A queue you can leave running: damaged spool entries are moved aside (the server
always starts), read errors are retried instead of forgotten, and a failing retry
runner is restarted. Real servers (subprocesses or in-thread), real spool files."""

from __future__ import annotations

import errno
import json
import logging
import mailbox
import smtplib
import time
from pathlib import Path

from conftest import ProcessServer, cli, free_port, wait_until, write_config

GOOD_ID = "00000000000010000aaaa"
DAMAGED = {
    "00000000000020000bbbb": b'{"id": "00000000000020000bbbb", "sender": "", "received_at": 1.0}\n',  # no recipients
    "00000000000030000cccc": b'{"id": "00000000000030000cccc", "sender": "me@remote.test", "rece',  # truncated
    "00000000000040000dddd": b"\x89PNG\r\n\x1a\n garbage \xff\xfe",
}


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def damaged_spool(tmp_path: Path) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir()
    for qid, raw in DAMAGED.items():
        (spool / f"{qid}.json").write_bytes(raw)
        (spool / f"{qid}.msg").write_bytes(b"Subject: damaged\n\nx\n")
    good = {"id": GOOD_ID, "sender": "me@remote.test", "received_at": time.time(), "recipients": [
        {"address": "alice@example.test", "state": "pending", "attempts": 0, "next_attempt": 0}]}
    (spool / f"{GOOD_ID}.msg").write_bytes(b"Subject: good one\n\nx\n")
    (spool / f"{GOOD_ID}.json").write_text(json.dumps(good))
    return spool


def test_damaged_entries_are_moved_aside_and_the_server_starts(tmp_path: Path):
    spool = damaged_spool(tmp_path)
    port = free_port()
    config = write_config(tmp_path, server={"listen": [f"127.0.0.1:{port}"], "spool_dir": "spool"})

    before = cli("queue", "list", "-c", str(config))  # no server yet: shown, not moved
    assert before.returncode == 0 and "Traceback" not in before.stderr, before.stderr
    for qid in DAMAGED:
        assert f"{qid}  damaged: queue entry {qid} is damaged" in before.stdout
    assert "-- 1 message(s) in queue, 3 damaged" in before.stdout
    shown = cli("queue", "show", "00000000000020000bbbb", "-c", str(config))
    assert shown.returncode == 1 and "is damaged: no recipients" in one_line_error(shown)
    flushed = cli("queue", "flush", "-c", str(config))
    assert flushed.returncode == 0 and "1 entry due now (3 damaged, left alone)" in flushed.stdout, flushed.stderr

    server = ProcessServer(config, port).start()
    wait_until(lambda: not (spool / f"{GOOD_ID}.json").exists())
    assert [m["Subject"] for m in mailbox.Maildir(tmp_path / "mail" / "alice", factory=None)] == ["good one"]
    for qid in DAMAGED:
        assert not (spool / f"{qid}.json").exists() and not (spool / f"{qid}.msg").exists()
        assert (spool / "corrupt" / f"{qid}.json").read_bytes() == DAMAGED[qid]  # kept for the admin
        assert (spool / "corrupt" / f"{qid}.msg").exists()
    after = cli("queue", "list", "-c", str(config))
    assert after.returncode == 0, after.stderr
    for qid in DAMAGED:
        assert f"{qid}  damaged, moved to {spool / 'corrupt'}: queue entry {qid} is damaged" in after.stdout
    assert server.terminate() == 0
    server.start()  # a restart does not report them again
    assert server.terminate() == 0
    log = server.log.read_text()
    assert "Traceback" not in log
    for qid in DAMAGED:
        assert log.count(f"{qid}: queue entry {qid} is damaged") == 1, log


def test_a_message_that_cannot_be_read_for_a_while_is_retried(process_server, tmp_path: Path):
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "bob.lock").write_text("0\n")  # another program holds bob's mbox (no pid: honoured)
    server = process_server(local={"lock_timeout": "0.05s"}, queue={"retry": ["1s"]})
    cfg = str(server.config_path)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        assert s.sendmail("me@remote.test", ["bob@example.test"], b"Subject: read error\r\n\r\nx\r\n") == {}
    (entry,) = (tmp_path / "spool").glob("*.json")
    qid, msg, aside = entry.stem, entry.with_suffix(".msg"), tmp_path / "aside.msg"
    assert "held" in cli("queue", "hold", qid, "-c", cfg).stdout
    msg.rename(aside)
    msg.mkdir()  # a folder where the message should be: reading it fails (EISDIR), as EMFILE or EIO would
    assert "notified" in cli("queue", "release", qid, "-c", cfg).stdout
    wait_until(lambda: f"{qid}: cannot read message of {qid}" in server.log.read_text())
    msg.rmdir()
    aside.rename(msg)
    (mail / "bob.lock").unlink()
    wait_until(lambda: (mail / "bob").exists() and len(mailbox.mbox(mail / "bob")) == 1)
    wait_until(lambda: not entry.exists())
    assert server.terminate() == 0
    assert "will try again" in server.log.read_text()


class FlakyClock:
    """The system clock, which raises once when told to (a fault injected through the
    queue's own clock parameter)."""

    def __init__(self) -> None:
        self.fail = False

    def __call__(self) -> float:
        if self.fail:
            self.fail = False
            raise OSError(errno.EMFILE, "Too many open files")
        return time.time()


def test_a_failing_retry_runner_is_restarted(serve, tmp_path: Path, caplog):
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "bob.lock").write_text("0\n")  # another program holds bob's mbox (no pid: honoured)
    clock = FlakyClock()
    server = serve(clock=clock, local={"lock_timeout": "0.05s"}, queue={"retry": ["1s"]})
    with caplog.at_level(logging.INFO), smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        assert s.sendmail("me@remote.test", ["bob@example.test"], b"Subject: runner\r\n\r\nx\r\n") == {}
        (mail / "bob.lock").unlink()
        clock.fail = True  # the runner is the next to read the clock, when the retry falls due
        wait_until(lambda: (mail / "bob").exists() and len(mailbox.mbox(mail / "bob")) == 1)
    assert not clock.fail
    assert any("queue runner failed; restarting it" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "spool").glob("*.json"))


async def test_the_retry_runner_stops_when_cancelled_as_it_wakes(tmp_path: Path):
    """A stop that lands just as the runner is woken (a flush, a finished retry) must stop
    it: on Python 3.11 ``asyncio.wait_for`` dropped such a cancel, and ``monomail serve``
    hung at shutdown (seen in CI after a flush-then-SIGTERM)."""
    import asyncio

    from monomail.config import load
    from monomail.queue import Queue
    from monomail.spool import Spool

    config = load(write_config(tmp_path))
    spool = Spool(tmp_path / "spool")

    async def deliver(*args):  # never called: the spool is empty
        raise AssertionError("no delivery expected")

    queue = Queue(spool, deliver, config.queue, hostname=config.hostname)
    await queue.load()
    for attempt in range(30):
        runner = asyncio.ensure_future(queue.run())
        for _ in range(attempt % 4):
            await asyncio.sleep(0)
        queue.flush()  # wakes the runner ...
        runner.cancel()  # ... and the stop lands in the same moment
        done, _ = await asyncio.wait({runner}, timeout=2)
        assert done and runner.cancelled(), f"runner ignored the cancel (round {attempt})"
