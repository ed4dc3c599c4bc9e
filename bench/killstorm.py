"""SIGKILL storm: kill monomail again and again under load, then check every accepted message.

Issue 8, acceptance 2. What it does, in one run of a few minutes on loopback only:

1. Starts a storing SMTP sink on 127.0.0.2 (a bare aiosmtpd server in a subprocess) that
   answers ``451`` to every ``--sink-fail-every``-th (default 5th) RCPT and every 5th
   DATA, and otherwise stores each message with its envelope recipients.
2. Starts ``python -m monomail serve`` (a subprocess, temporary directory, generated
   config) with local users ``alice`` (Maildir), ``bob`` and ``carol`` (mbox), the remote
   domain ``sink.test`` routed to the sink by ``remote.smarthost = "127.0.0.2:PORT"``
   (``dns.nameservers`` is an unused loopback port: nothing reaches a real resolver), and
   ``queue.retry = ["1s"]``.
3. ``--sessions`` (default 10) client sessions send continuously over reused connections,
   each message with a unique token (in its Message-ID and first body line) and one to
   three recipients drawn from alice, bob, carol, ``x@sink.test`` and ``y@sink.test``;
   most messages are 1-4 KB, some 16-64 KB, a few 256 KB. For every message the client
   records what each RCPT and the end of DATA answered.
4. ``--kills`` (default 20) times, after a random 0.5-1.5 s under load, SIGKILLs the
   server and starts it again on the same spool and port (the clients reconnect).
5. Stops the load, lets the last server run until the spool holds no entry (or
   ``--drain-timeout``), sends one probe message to each mailbox and the sink and checks
   each is delivered within ``--probe-timeout``, stops the server with SIGTERM.
6. Reads everything back (Maildir and mbox with the stdlib ``mailbox`` module, the sink's
   store) and checks: every recipient of every message that got a ``250`` after DATA
   (and a ``250`` for that RCPT) is delivered; every delivered copy of a known message
   has exactly the body that was sent (SHA-256 of the LF-normalised body) and parses;
   nothing unknown is in a mailbox; no ``*.lock`` is left beside an mbox; every probe
   arrived in time. Duplicates are counted per kind (maildir / mbox / remote). Messages
   without a ``250`` (a 4xx/5xx reply, or the connection killed mid-transaction) may or
   may not be delivered: they are counted separately.

Usage::

    python bench/killstorm.py [--kills 20] [--seed 1] [--sessions 10] [--json] [--keep]

The exit status is 1 if an accepted message is lost or a copy is corrupt, a mailbox is
left blocked (a lock file, a probe not delivered in time), the server could not be
restarted, or the run did not finish within ``--max-seconds``. Duplicates are reported
but do not fail the run (at-least-once is the contract). The seed fixes the kill
intervals, recipients and sizes; the moments the kills land in the protocol depend on
timing and differ from run to run. Every subprocess is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import email.parser
import email.policy
import hashlib
import json
import mailbox
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    ERRORS,
    SENDER,
    Client,
    add_output_options,
    data_payload,
    describe,
    finite,
    free_port,
    message_lines,
    progress,
    run_benchmark,
    serve_sink_until_signalled,
    start_server,
    stop_server,
    write_monomail_config,
)

HOST = "127.0.0.1"  # monomail listens here
SINK_HOST = "127.0.0.2"  # the "remote" sink
SINK_DOMAIN = "sink.test"
KINDS = {  # recipient -> kind of destination
    "alice@example.test": "maildir",
    "bob@example.test": "mbox",
    "carol@example.test": "mbox",
    f"x@{SINK_DOMAIN}": "remote",
    f"y@{SINK_DOMAIN}": "remote",
}
LOCAL_USERS = {"alice": "maildir", "bob": "mbox", "carol": "mbox"}
REPLY_TIMEOUT = 60.0  # one SMTP transaction; above lock_timeout and remote.cut_through
MAX_SHOWN = 8
_TOKEN = re.compile(r"<(storm-[A-Za-z0-9-]+)\.\d+\.[0-9a-f]+@client\.example\.net>")


# -- the sink (runs in a subprocess: ``killstorm.py --serve-sink PORT``; cwd: its folder) ------


class StoringSink:
    """aiosmtpd handler: 451 to every ``fail_every``-th RCPT and DATA, else stores the message
    as ``store/<n>.eml`` and appends ``{"file", "rcpts", "from"}`` to ``store/index.jsonl``."""

    def __init__(self, store: Path, fail_every: int) -> None:
        self.store = store
        self.fail_every = fail_every
        self.rcpts = self.datas = self.stored = 0
        store.mkdir(parents=True, exist_ok=True)
        self.index = (store / "index.jsonl").open("a", encoding="utf-8")

    def _fail(self, count: int) -> bool:
        return self.fail_every > 0 and count % self.fail_every == 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpts += 1
        if self._fail(self.rcpts):
            return "451 4.3.0 sink: try again later (every Nth RCPT)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.datas += 1
        if self._fail(self.datas):
            return "451 4.3.0 sink: try again later (every Nth DATA)"
        self.stored += 1
        name = f"{self.stored:07d}.eml"
        (self.store / name).write_bytes(envelope.original_content or envelope.content)
        self.index.write(json.dumps({"file": name, "rcpts": list(envelope.rcpt_tos),
                                     "from": envelope.mail_from}) + "\n")
        self.index.flush()
        return "250 OK"


async def serve_sink(port: int, fail_every: int) -> None:
    await serve_sink_until_signalled(SINK_HOST, port, "mx.sink.test", StoringSink(Path("store"), fail_every))


# -- messages and the ledger ----------------------------------------------------------


@dataclass
class Sent:
    """One message the load generator tried to send, and what the server answered."""

    token: str
    rcpts: list[str]
    size: int
    sha: str  # SHA-256 of the body as it should be stored (LF endings)
    accepted: list[str] = field(default_factory=list)  # recipients whose RCPT got 250
    state: str = "unsent"  # unsent | acked | refused | broken
    reply: str = ""  # the last reply, or what went wrong


def build(token: str, index: int, size: int, rcpts: list[str]) -> tuple[bytes, str]:
    """The DATA payload of one message and the SHA-256 of its body with LF endings."""
    lines = message_lines(index, size, token, ", ".join(f"<{r}>" for r in rcpts), f"Hello, this is {token}.")
    body = lines[lines.index("") + 1:]
    sha = hashlib.sha256(("\n".join(body) + "\n").encode("ascii")).hexdigest()
    return data_payload(lines), sha


def pick_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.75:
        return rng.randint(1024, 4096)
    if roll < 0.95:
        return rng.randint(16 * 1024, 64 * 1024)
    return 256 * 1024


# -- the load -------------------------------------------------------------------------


@dataclass
class Load:
    ledger: dict[str, Sent] = field(default_factory=dict)
    stage: dict[int, str] = field(default_factory=dict)  # session -> what it is doing now
    connect_failures: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def transaction(client: Client, rec: Sent, payload: bytes, load: Load, n: int) -> None:
    """MAIL, each RCPT, DATA, payload; ``rec`` records the answers (raises on a broken connection)."""
    load.stage[n] = "MAIL"
    code, text = await client.exchange("MAIL", b"MAIL FROM:<" + SENDER.encode() + b">\r\n")
    if code != 250:
        rec.state, rec.reply = "refused", f"MAIL: {text}"
        return
    load.stage[n] = "RCPT"
    for rcpt in rec.rcpts:
        code, text = await client.exchange("RCPT", b"RCPT TO:<" + rcpt.encode() + b">\r\n")
        if code in (250, 251):
            rec.accepted.append(rcpt)
        else:
            rec.reply = f"RCPT {rcpt}: {text}"
    if not rec.accepted:
        rec.state = "refused"
        await client.exchange("RSET", b"RSET\r\n")
        return
    load.stage[n] = "DATA"
    code, text = await client.exchange("DATA", b"DATA\r\n")
    if code != 354:
        rec.state, rec.reply = "refused", f"DATA: {text}"
        return
    load.stage[n] = "payload"
    code, text = await client.exchange("message", payload)
    rec.state, rec.reply = ("acked" if code == 250 else "refused"), text


async def session(n: int, port: int, seed: int, load: Load) -> None:
    """Send messages over one connection until ``load.stop``; reconnect after any error."""
    rng = random.Random(seed * 1000 + n)
    client: Client | None = None
    seq = 0
    try:
        while not load.stop.is_set():
            if client is None:
                load.stage[n] = "connect"
                client = Client(HOST, port)
                try:
                    async with asyncio.timeout(10):
                        await client.open()
                except ERRORS:
                    load.connect_failures += 1
                    await client.close()
                    client = None
                    load.stage[n] = "down"
                    await asyncio.sleep(rng.uniform(0.02, 0.1))
                    continue
            token = f"storm-{n:02d}-{seq:05d}"
            rcpts = rng.sample(list(KINDS), rng.choice((1, 1, 2, 3)))
            size = pick_size(rng)
            payload, sha = build(token, n * 100_000 + seq, size, rcpts)
            seq += 1
            rec = load.ledger[token] = Sent(token, rcpts, size, sha)
            try:
                async with asyncio.timeout(REPLY_TIMEOUT):
                    await transaction(client, rec, payload, load, n)
            except ERRORS as exc:
                rec.state, rec.reply = "broken", describe(client.stage, exc, REPLY_TIMEOUT)
                await client.close()
                client = None
            load.stage[n] = "idle"
        if client is not None:
            with contextlib.suppress(*ERRORS):
                async with asyncio.timeout(5):
                    await client.quit()
    finally:
        load.stage[n] = "done"
        if client is not None:
            await client.close()


# -- the storm ------------------------------------------------------------------------


@dataclass
class Server:
    """The monomail server of the run, restarted on the same port and spool after every kill."""

    cmd: list[str]
    port: int
    workdir: Path
    procs: list[subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait for its banner; the seconds that took."""
        t0 = time.perf_counter()
        self.proc = start_server(self.cmd, HOST, self.port, self.workdir, "monomail", self.procs,
                                 label="monomail serve", where=f"{HOST}:{self.port}")
        return time.perf_counter() - t0


async def storm(server: Server, load: Load, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Kill and restart ``args.kills`` times; one record per kill."""
    rng = random.Random(args.seed)
    kills = []
    for k in range(args.kills):
        await asyncio.sleep(rng.uniform(args.min_interval, args.max_interval))
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise RuntimeError(f"monomail exited by itself (status {server.proc.returncode}) before kill {k + 1}")
        stages = collections.Counter(load.stage.values())
        acked = sum(1 for r in load.ledger.values() if r.state == "acked")
        server.proc.kill()
        await asyncio.to_thread(server.proc.wait, 10)
        restart = await asyncio.to_thread(server.start)
        kills.append({"kill": k + 1, "acked_before": acked, "sessions": dict(stages),
                      "restart_s": round(restart, 3)})
        busy = sum(v for s, v in stages.items() if s in ("MAIL", "RCPT", "DATA", "payload"))
        progress(f"  kill {k + 1:2d}/{args.kills}: {busy} session(s) mid-transaction "
                 f"({', '.join(f'{s} {v}' for s, v in sorted(stages.items()))}), {acked} acked so far, "
                 f"restarted in {restart:.2f}s")
    return kills


def spool_state(spool: Path) -> dict[str, int]:
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        names = []
    corrupt = spool / "corrupt"
    return {"entries": sum(1 for n in names if n.endswith(".json") and not n.startswith(".")),
            "temp_files": sum(1 for n in names if n.startswith(".tmp")),
            "corrupt": len(os.listdir(corrupt)) if corrupt.is_dir() else 0}


async def drain(spool: Path, timeout: float) -> tuple[float, dict[str, int]]:
    """Wait until the spool holds no entry (or ``timeout``); seconds waited and the spool state."""
    t0 = time.perf_counter()
    while True:
        state = spool_state(spool)
        waited = time.perf_counter() - t0
        if state["entries"] == 0 or waited > timeout:
            return waited, state
        await asyncio.sleep(0.25)


# -- reading back -----------------------------------------------------------------------


_parser = email.parser.BytesParser(policy=email.policy.compat32)


def body_of(raw: bytes) -> tuple[str | None, bytes]:
    """The token (from the Message-ID) and the LF-normalised body of one stored message."""
    raw = raw.replace(b"\r\n", b"\n")
    head, sep, body = raw.partition(b"\n\n")
    msg = _parser.parsebytes(head + b"\n\n", headersonly=True)
    found = _TOKEN.search(str(msg.get("Message-ID", "")))
    return (found.group(1) if found else None), (body if sep else b"")


@dataclass
class Copies:
    """Every stored copy, by (token, recipient); and what could not be matched to a sent message."""

    count: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    corrupt: list[str] = field(default_factory=list)
    bounces: int = 0

    def add(self, where: str, rcpt: str, raw: bytes, ledger: dict[str, Sent], mbox: bool) -> None:
        try:
            token, body = body_of(raw)
        except Exception as exc:  # noqa: BLE001 - an unparsable copy is a finding, not a crash
            self.corrupt.append(f"{where}: unparsable ({type(exc).__name__}: {exc})")
            return
        rec = ledger.get(token or "")
        if rec is None:
            self.corrupt.append(f"{where}: unknown message (token {token!r}, {len(raw)} bytes)")
            return
        sha = hashlib.sha256(body).hexdigest()
        # an mbox message ends with the empty separator line before the next "From "
        trimmed = mbox and body.endswith(b"\n\n") and hashlib.sha256(body[:-1]).hexdigest() == rec.sha
        if sha != rec.sha and not trimmed:
            self.corrupt.append(f"{where}: {token} body differs from what was sent ({len(body)} bytes, "
                                f"{rec.size} expected about)")
            return
        self.count[(rec.token, rcpt)] += 1


def read_back(workdir: Path, ledger: dict[str, Sent]) -> Copies:
    copies = Copies()
    mail = workdir / "mail"
    for user, kind in LOCAL_USERS.items():
        rcpt = f"{user}@example.test"
        path = mail / user
        if not path.exists():
            continue
        try:
            if kind == "maildir":
                md = mailbox.Maildir(path, factory=None, create=False)
                for key in md.iterkeys():
                    copies.add(f"maildir {user}/{key}", rcpt, md.get_bytes(key), ledger, mbox=False)
            else:
                mb = mailbox.mbox(path, create=False)
                for i, key in enumerate(mb.iterkeys()):
                    copies.add(f"mbox {user} #{i + 1}", rcpt, mb.get_bytes(key), ledger, mbox=True)
        except Exception as exc:  # noqa: BLE001 - a mailbox the stdlib cannot read is corrupt
            copies.corrupt.append(f"{kind} {user}: cannot be read ({type(exc).__name__}: {exc})")
    store = workdir / "sink" / "store"
    with contextlib.suppress(FileNotFoundError), (store / "index.jsonl").open(encoding="utf-8") as index:
        for line in index:
            entry = json.loads(line)
            raw = (store / entry["file"]).read_bytes()
            remote = [r for r in entry["rcpts"] if r.lower() in KINDS]
            if not remote:  # a bounce or a notice to our sender: none is expected
                copies.bounces += 1
                continue
            for rcpt in remote:
                copies.add(f"sink {entry['file']}", rcpt.lower(), raw, ledger, mbox=False)
    return copies


def lock_files(workdir: Path) -> list[str]:
    out = []
    for path in sorted((workdir / "mail").glob("*.lock")):
        with contextlib.suppress(OSError):
            st = path.stat()
            out.append(f"{path.name} ({st.st_size} bytes, {time.time() - st.st_mtime:.0f}s old)")
    return out


def maildir_tmp(workdir: Path) -> int:
    tmp = workdir / "mail" / "alice" / "tmp"
    return len(os.listdir(tmp)) if tmp.is_dir() else 0


# -- the probe: is every mailbox usable afterwards? --------------------------------------


async def probe(port: int, ledger: dict[str, Sent], workdir: Path, timeout: float) -> dict[str, Any]:
    """One message to each destination; seconds until it is stored (None if not within ``timeout``)."""
    results: dict[str, Any] = {}

    async def one(i: int, rcpt: str) -> None:
        token = f"storm-probe-{i}"
        payload, sha = build(token, 9_000_000 + i, 1500, [rcpt])
        rec = ledger[token] = Sent(token, [rcpt], 1500, sha)
        client = Client(HOST, port)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await client.open()
                await transaction(client, rec, payload, Load(), 0)
                while not read_back_one(workdir, rcpt, token):
                    await asyncio.sleep(0.1)
            results[rcpt] = {"seconds": round(time.perf_counter() - t0, 3), "reply": rec.reply}
        except ERRORS as exc:
            if rec.state == "unsent":
                rec.state = "broken"
            results[rcpt] = {"seconds": None, "reply": rec.reply or describe(client.stage, exc, timeout)}
        finally:
            await client.close()

    await asyncio.gather(*(one(i, r) for i, r in enumerate(["alice@example.test", "bob@example.test",
                                                           "carol@example.test", f"x@{SINK_DOMAIN}"])))
    return results


def read_back_one(workdir: Path, rcpt: str, token: str) -> bool:
    """Whether the message ``token`` has reached ``rcpt`` (a cheap look, not the full check)."""
    needle = token.encode()
    user = rcpt.partition("@")[0]
    if KINDS[rcpt] == "remote":
        store = workdir / "sink" / "store"
        paths = sorted(store.glob("*.eml"))[-50:]
    elif KINDS[rcpt] == "maildir":
        paths = list((workdir / "mail" / user / "new").iterdir()) + list((workdir / "mail" / user / "cur").iterdir())
    else:
        with contextlib.suppress(OSError), (workdir / "mail" / user).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            return needle in f.read()
        return False
    for p in paths:
        with contextlib.suppress(OSError):
            if needle in p.read_bytes()[:4096]:
                return True
    return False


# -- the verdict ------------------------------------------------------------------------


def queued_tokens(spool: Path) -> set[str]:
    """Tokens of the messages still in the spool (entries with a ``.json``)."""
    out = set()
    for msg in spool.glob("*.msg"):
        if msg.with_suffix(".json").exists():
            with contextlib.suppress(OSError):
                token, _ = body_of(msg.read_bytes()[:16384])
                if token:
                    out.add(token)
    return out


def verdict(ledger: dict[str, Sent], copies: Copies, queued: set[str]) -> dict[str, Any]:
    """Expected / delivered / duplicates per kind; lost (still queued or gone), corrupt, not acked."""
    kinds = sorted(set(KINDS.values()))
    expected = dict.fromkeys(kinds, 0)
    delivered = dict.fromkeys(kinds, 0)
    duplicates = dict.fromkeys(kinds, 0)
    lost: list[str] = []
    for (_token, rcpt), n in copies.count.items():
        duplicates[KINDS[rcpt]] += n - 1
    states = collections.Counter(r.state for r in ledger.values())
    unacked_delivered = refused_delivered = 0
    for rec in ledger.values():
        if rec.state == "acked":
            for rcpt in rec.accepted:
                kind = KINDS[rcpt]
                expected[kind] += 1
                if copies.count[(rec.token, rcpt)]:
                    delivered[kind] += 1
                else:
                    where = "still queued" if rec.token in queued else "gone"
                    lost.append(f"{rec.token} -> {rcpt} ({kind}, {where}; reply was {rec.reply!r})")
        elif any(copies.count[(rec.token, r)] for r in rec.rcpts):
            if rec.state == "refused":
                refused_delivered += 1
            else:
                unacked_delivered += 1
    return {
        "messages": dict(states), "expected": expected, "delivered": delivered, "duplicates": duplicates,
        "lost": len(lost), "lost_still_queued": sum("still queued" in x for x in lost),
        "lost_examples": lost[:MAX_SHOWN],
        "corrupt": len(copies.corrupt), "corrupt_examples": copies.corrupt[:MAX_SHOWN],
        "broken_delivered": unacked_delivered, "broken_not_delivered": states["broken"] - unacked_delivered,
        "refused_delivered": refused_delivered, "bounces_at_sink": copies.bounces,
    }


def log_problems(workdir: Path) -> tuple[collections.Counter[str], int]:
    """WARNING / ERROR / Traceback lines of all the servers' logs, with numbers and ids blurred;
    and how many were the deferrals the sink's 451s asked for (left out of the first)."""
    found: collections.Counter[str] = collections.Counter()
    expected = 0
    for name in ("monomail-log.txt", "monomail.log"):
        with contextlib.suppress(OSError):
            for line in (workdir / name).read_text(errors="replace").splitlines():
                if "status=deferred" in line and "sink: try again later" in line:
                    expected += 1
                elif " WARNING " in line or " ERROR " in line or line.startswith("Traceback"):
                    text = line.split(" WARNING ", 1)[-1].split(" ERROR ", 1)[-1].replace(str(workdir), "<dir>")
                    found[re.sub(r"\b[0-9A-Za-z]{12,}\b|\d+(\.\d+)?", "#", text)[:160]] += 1
    return found, expected


def first_traceback(workdir: Path) -> list[str]:
    """The first traceback in the servers' logs, with the line before it (up to 30 lines)."""
    for name in ("monomail-log.txt", "monomail.log"):
        with contextlib.suppress(OSError):
            lines = (workdir / name).read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if line.startswith("Traceback"):
                    out = lines[max(0, i - 1):i + 1]
                    for more in lines[i + 1:i + 30]:
                        if more[:4].isdigit():  # the next timestamped log line
                            break
                        out.append(more)
                    return [x.replace(str(workdir), "<dir>") for x in out]
    return []


def print_report(doc: dict[str, Any]) -> None:
    v = doc["check"]
    s = doc["settings"]
    print(f"\nSIGKILL storm: {len(doc['kills'])} kills every {s['min_interval']}-{s['max_interval']} s under load "
          f"from {s['sessions']} sessions, seed {s['seed']}; sink 451s every {s['sink_fail_every']}th RCPT/DATA")
    m = v["messages"]
    print(f"messages sent: {sum(m.values())}: {m.get('acked', 0)} acked (250), {m.get('refused', 0)} refused "
          f"(4xx/5xx), {m.get('broken', 0)} broken (connection killed mid-transaction)")
    mid = sum(sum(n for st, n in k["sessions"].items() if st in ("MAIL", "RCPT", "DATA", "payload"))
              for k in doc["kills"])
    print(f"kills landed with {mid} session-transactions in flight in all; restart took "
          f"{min((k['restart_s'] for k in doc['kills']), default=0):.2f}-"
          f"{max((k['restart_s'] for k in doc['kills']), default=0):.2f} s")
    print(f"drain: spool empty after {doc['drain_s']:.1f} s" if doc["spool_after_drain"]["entries"] == 0 else
          f"drain: {doc['spool_after_drain']['entries']} spool entries left after {doc['drain_s']:.1f} s")
    print(f"{'kind':8} {'expected':>8} {'delivered':>9} {'duplicates':>10}")
    for kind in v["expected"]:
        print(f"{kind:8} {v['expected'][kind]:8d} {v['delivered'][kind]:9d} {v['duplicates'][kind]:10d}")
    print(f"lost (acked, not delivered): {v['lost']} ({v['lost_still_queued']} still queued, "
          f"{v['lost'] - v['lost_still_queued']} gone); corrupt copies: {v['corrupt']}")
    for line in v["lost_examples"] + v["corrupt_examples"]:
        print(f"  {line}")
    print(f"not acked: {v['broken_delivered']} broken ones delivered anyway, {v['broken_not_delivered']} not; "
          f"{v['refused_delivered']} refused ones delivered anyway; {v['bounces_at_sink']} bounces at the sink")
    probe = ", ".join(f"{r.split('@')[0]} " + ("-" if p["seconds"] is None else f"{p['seconds']:.2f}s")
                      for r, p in doc["probe"].items())
    print(f"probe deliveries afterwards: {probe}")
    for r, p in doc["probe"].items():
        if p["seconds"] is None:
            print(f"  probe to {r} not delivered within {s['probe_timeout']} s: {p['reply']}")
    print(f"lock files left: {', '.join(doc['lock_files']) or 'none'}; Maildir tmp/ files left: {doc['maildir_tmp']}; "
          f"spool at the end: {doc['spool_end']}")
    print(f"deferrals logged for the sink's 451s (expected): {doc['sink_deferrals_logged']}")
    if doc["log_problems"]:
        print("other server log warnings/errors (numbers blurred):")
        for text, n in list(doc["log_problems"].items())[:MAX_SHOWN]:
            print(f"  x{n}: {text}")
    if doc["first_traceback"]:
        print("first traceback in the server logs:")
        for line in doc["first_traceback"]:
            print(f"  | {line}")
    if doc.get("error"):
        print(f"RUN ERROR: {doc['error']}")
    print("verdict: " + ("OK" if doc["ok"] else "FAIL (" + "; ".join(doc["reasons"]) + ")"))


# -- main -----------------------------------------------------------------------------


def monomail_config(workdir: Path, port: int, sink_port: int, args: argparse.Namespace) -> Path:
    return write_monomail_config(
        workdir, hostname="storm.example.test", listen=f"{HOST}:{port}",
        max_connections=max(100, 2 * args.sessions + 10), user="alice",
        local_extra=f'lock_timeout = "{args.lock_timeout}"\n',
        sections=f"""\
[users.bob]
mailbox_format = "mbox"

[users.carol]
mailbox_format = "mbox"

[aliases]
postmaster = ["alice"]

[queue]
retry = ["1s"]

[dns]
nameservers = ["{HOST}:{free_port(HOST)}"]
timeout = "2s"

[remote]
smarthost = "{SINK_HOST}:{sink_port}"

""")


async def amain(args: argparse.Namespace, workdir: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    sink_port = free_port(SINK_HOST)
    progress(f"sink: storing aiosmtpd on {SINK_HOST}:{sink_port}, 451 to every {args.sink_fail_every}th RCPT/DATA")
    start_server([sys.executable, str(Path(__file__).resolve()), "--serve-sink", str(sink_port),
                  "--sink-fail-every", str(args.sink_fail_every)], SINK_HOST, sink_port, workdir / "sink", "sink",
                 procs)
    port = free_port(HOST)
    config = monomail_config(workdir, port, sink_port, args)
    server = Server([sys.executable, "-m", "monomail", "serve", "-c", str(config)], port, workdir, procs)
    progress(f"monomail: starting on {HOST}:{port}")
    server.start()
    load = Load()
    probes: dict[str, Sent] = {}  # the final probe messages: known to the read-back, not in the tally
    spool = workdir / "spool"
    doc: dict[str, Any] = {
        "settings": {k: getattr(args, k) for k in ("kills", "seed", "sessions", "min_interval", "max_interval",
                                                    "drain_timeout", "probe_timeout", "lock_timeout",
                                                    "sink_fail_every", "max_seconds")},
        "kills": [], "drain_s": None, "spool_after_drain": {}, "probe": {}, "error": None,
    }
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(session(n, port, args.seed, load)) for n in range(args.sessions)]
    try:
        async with asyncio.timeout(args.max_seconds):
            doc["kills"] = await storm(server, load, args)
            progress("  storm over: stopping the load")
            load.stop.set()
            await asyncio.gather(*tasks)
            progress(f"  draining the spool (up to {args.drain_timeout:g} s)")
            doc["drain_s"], doc["spool_after_drain"] = await drain(spool, args.drain_timeout)
            progress("  probing every mailbox")
            doc["probe"] = await probe(port, probes, workdir, args.probe_timeout)
    except (RuntimeError, TimeoutError) as exc:
        doc["error"] = str(exc) or f"the run did not finish within --max-seconds {args.max_seconds:g}"
    finally:
        load.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        doc["server_exit"] = await asyncio.to_thread(stop_server, server.proc) if server.proc else None
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    with (workdir / "ledger.jsonl").open("w", encoding="utf-8") as f:  # for a look with --keep
        for rec in [*load.ledger.values(), *probes.values()]:
            f.write(json.dumps(asdict(rec)) + "\n")
    progress("  reading every mailbox back")
    copies = read_back(workdir, {**load.ledger, **probes})
    doc["check"] = verdict(load.ledger, copies, queued_tokens(spool))
    doc["lock_files"] = lock_files(workdir)
    doc["maildir_tmp"] = maildir_tmp(workdir)
    doc["spool_end"] = spool_state(spool)
    doc["connect_failures"] = load.connect_failures
    problems, doc["sink_deferrals_logged"] = log_problems(workdir)
    doc["first_traceback"] = first_traceback(workdir)
    doc["log_problems"] = dict(problems.most_common())
    v = doc["check"]
    reasons = []
    if v["lost"]:
        reasons.append(f"{v['lost']} accepted deliveries lost")
    if v["corrupt"]:
        reasons.append(f"{v['corrupt']} corrupt or unknown copies")
    if doc["lock_files"]:
        reasons.append(f"lock files left: {', '.join(doc['lock_files'])}")
    slow = [r for r, p in doc["probe"].items() if p["seconds"] is None]
    if slow or not doc["probe"]:
        reasons.append(f"probe not delivered within {args.probe_timeout:g} s: {', '.join(slow) or 'no probe ran'}")
    if doc["error"]:
        reasons.append(doc["error"])
    doc["reasons"] = reasons
    doc["ok"] = not reasons
    if args.json:
        print(json.dumps(finite(doc), indent=2))
    else:
        print_report(doc)
    return 0 if doc["ok"] else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs under load (default 20)")
    p.add_argument("--seed", type=int, default=1, help="seed for kill intervals, recipients, sizes (default 1)")
    p.add_argument("--sessions", type=int, default=10, help="client sessions sending continuously (default 10)")
    p.add_argument("--min-interval", type=float, default=0.5, help="least seconds between restart and kill (0.5)")
    p.add_argument("--max-interval", type=float, default=1.5, help="most seconds between restart and kill (1.5)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds the last server may take to empty the spool (default 60)")
    p.add_argument("--probe-timeout", type=float, default=10.0,
                   help="seconds a final probe message may take to reach its mailbox (default 10)")
    p.add_argument("--lock-timeout", default="10s", help="monomail's local.lock_timeout (default its own, 10s)")
    p.add_argument("--sink-fail-every", type=int, default=5,
                   help="the sink answers 451 to every Nth RCPT and every Nth DATA; 0: never (default 5)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run (default 300)")
    add_output_options(p, "keep the temporary directory (config, logs, mailboxes, spool, sink store)")
    args = p.parse_args(argv)
    if args.kills < 0 or args.sessions < 1 or args.sink_fail_every < 0:
        p.error("--kills must not be negative, --sessions at least 1, --sink-fail-every not negative")
    if not 0 < args.min_interval <= args.max_interval:
        p.error("expected 0 < --min-interval <= --max-interval")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("killstorm", "monomail-storm-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs),
                         lambda port: serve_sink(port, args.sink_fail_every))


if __name__ == "__main__":
    sys.exit(main())
