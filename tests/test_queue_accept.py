"""`Queue.accept`, the promise behind the 250: cut-through that outlives its budget is
journalled and answered while the attempt goes on, and a client that hangs up never tears
a delivery in half. A real spool on disk; the deliver function is the queue's own seam
(it is handed in), here one that waits until the test lets it finish."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from conftest import write_config

from monomail.config import load
from monomail.envelope import Envelope, Outcome, Status, new_id
from monomail.errors import Reply
from monomail.queue import Queue
from monomail.spool import Spool

DATA = b"Subject: hello\n\nbody\n"
DONE = Reply(250, "2.0.0", "Delivered")


def envelope() -> Envelope:
    now = time.time()
    return Envelope(new_id(now), "me@remote.test", ("alice@example.test",), now, False, len(DATA))


def setup(tmp_path: Path, cut_through: float) -> tuple[Queue, Spool, asyncio.Event, list[str]]:
    config = load(write_config(tmp_path))
    spool = Spool(tmp_path / "spool")
    spool.create()
    release = asyncio.Event()
    calls: list[str] = []

    async def deliver(env, data, recipients, finished):
        calls.append(env.id)
        await release.wait()
        return [Outcome(r, Status.DELIVERED, DONE, "maildir somewhere") for r in recipients or env.recipients]

    return Queue(spool, deliver, config.queue, hostname=config.hostname, cut_through=cut_through), spool, release, calls


async def test_an_attempt_past_cut_through_is_journalled_answered_then_recorded(tmp_path: Path):
    queue, spool, release, calls = setup(tmp_path, cut_through=0.2)
    env = envelope()
    started = time.monotonic()
    reply = await asyncio.wait_for(queue.accept(env, DATA), 5)
    assert reply.code == 250 and f"queued as {env.id}" in reply.text
    assert 0.15 < time.monotonic() - started < 3
    assert spool.exists(env.id) and spool.message(env.id) == DATA  # journalled before the 250
    assert queue.size == 1 and calls == [env.id]  # busy: the runner leaves it to the running attempt
    release.set()
    for _ in range(100):
        if not spool.exists(env.id):
            break
        await asyncio.sleep(0.02)
    assert not spool.exists(env.id)  # the attempt's outcome was recorded: delivered, nothing left
    assert queue.size == 0 and calls == [env.id]
    await queue.close(2)


async def test_a_client_that_hangs_up_does_not_stop_its_delivery(tmp_path: Path):
    queue, spool, release, calls = setup(tmp_path, cut_through=30)
    env = envelope()
    session = asyncio.ensure_future(queue.accept(env, DATA))
    while not calls:
        await asyncio.sleep(0.01)
    session.cancel()  # the client went away before the answer
    await asyncio.sleep(0.05)
    release.set()
    await queue.close(2)
    assert session.cancelled() and calls == [env.id]
    assert not spool.exists(env.id) and queue.size == 0


async def test_fast_path_answers_with_the_outcome(tmp_path: Path):
    queue, spool, release, _ = setup(tmp_path, cut_through=30)
    release.set()
    env = envelope()
    reply = await asyncio.wait_for(queue.accept(env, DATA), 5)
    assert reply.code == 250 and f"delivered as {env.id}" in reply.text
    assert not spool.exists(env.id) and queue.size == 0
    await queue.close(2)
