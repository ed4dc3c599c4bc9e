"""Latency benchmark: small messages beside a big one (issue 8, defect 13, acceptance 3).

What it measures: the latency of small messages (``--size``, default 2 KB) sent by
``--sessions`` (default 10) concurrent sessions to ``monomail serve``, in two phases of
the same run and the same server process:

- ``a`` (alone): only the small sessions, for ``--duration`` seconds;
- ``b`` (beside a big one): the same, while one extra session streams a ``--big-size``
  (default 20 MB) message, back to back, for the whole phase (the transfer in flight at the
  end of the phase is awaited and counted).

The latency of one small message is the whole SMTP transaction on a reused connection:
from writing ``MAIL FROM`` to reading the ``250`` after the DATA payload (MAIL, RCPT,
DATA, payload: four round trips, no pipelining). Connection set-up is not timed. For each
phase it reports p50 / p90 / p99 / max and msgs/s, and the ratio p99(b) / p99(a); the
acceptance target of issue 8 is a ratio of at most 3. For each big transfer: the seconds
from ``MAIL FROM`` to its ``250`` and the reply.

monomail runs as a subprocess (``python -m monomail serve``) in a temporary directory with
a generated config: one trusted listener on 127.0.0.1, one Maildir user, and
``server.max_message_size`` big enough for the big message. Every message is delivered
durably (spool, fsync, Maildir). The load generator is this process (raw asyncio streams,
uvloop if importable); the big message is written 64 KB at a time, waiting for the socket
to drain. This process's own event-loop lag is sampled in each phase (``client lag``), so
a slow load generator shows instead of being blamed on the server. Afterwards the Maildir
must hold exactly the messages accepted and the spool must be empty.

Usage::

    python bench/latency.py [--duration 10] [--sessions 10] [--size 2048]
                            [--big-size 20971520] [--json] [--keep]

The exit status is 1 if any message (small or big) failed, the Maildir check did not match
or the server did not stop cleanly; with ``--max-ratio R`` also if p99(b)/p99(a) > R.
Everything listens on 127.0.0.1 only, is bounded in time, and every subprocess is killed
on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    ERRORS,
    Client,
    LoopLag,
    add_output_options,
    cpu_seconds,
    data_payload,
    describe,
    finite,
    free_port,
    loop_name,
    message_lines,
    percentiles_ms,
    progress,
    run_benchmark,
    start_server,
    stop_server,
    write_monomail_config,
)

HOST = "127.0.0.1"
RECIPIENT = "alice@example.test"
REPLY_TIMEOUT = 120.0  # seconds one SMTP transaction may take before it counts as failed
BIG_CHUNK = 65536
MAX_SHOWN_FAILURES = 8


# -- messages -------------------------------------------------------------------------


def small_message(index: int, size: int, tag: str) -> bytes:
    return data_payload(message_lines(index, size, tag, "Alice Example <alice@example.test>", "Hello Alice,"))


def big_message(size: int) -> bytes:
    """One plain-text message of about ``size`` bytes: a small message's lines, its body
    repeated (built in well under a second even for 20 MB)."""
    lines = message_lines(0, 64 * 1024, "big", "Alice Example <alice@example.test>", "Hello Alice,")
    head = lines[:lines.index("") + 1]
    body = lines[len(head):]
    block = "\r\n".join(("." + x if x.startswith(".") else x) for x in body) + "\r\n"
    head_bytes = ("\r\n".join(head) + "\r\n").encode("ascii")
    repeat = max(1, (size - len(head_bytes)) // len(block) + 1)
    return head_bytes + (block * repeat).encode("ascii") + b".\r\n"


# -- the load -------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    big: list[dict[str, Any]] = field(default_factory=list)  # one per big transfer
    client_lag: dict[str, float] = field(default_factory=dict)
    server_cpu: float = float("nan")  # percent of one core


Transaction = Callable[[Client], Awaitable[None]]


async def session(port: int, stop: asyncio.Event, phase: Phase, transaction: Transaction,
                  failed: Callable[[str], None]) -> None:
    """Run ``transaction`` over one connection until ``stop`` (reconnecting after an error,
    whose description goes to ``failed``); the transaction in flight is finished."""
    client: Client | None = None
    try:
        while not stop.is_set():
            try:
                async with asyncio.timeout(REPLY_TIMEOUT):
                    if client is None:
                        client = Client(HOST, port)
                        await client.open()
                    await transaction(client)
            except ERRORS as exc:
                failed(describe(client.stage if client else "connect", exc, REPLY_TIMEOUT))
                if client is not None:
                    await client.close()
                client = None
                await asyncio.sleep(0.1)
        if client is not None:
            async with asyncio.timeout(10):
                await client.quit()
    except ERRORS:
        pass
    finally:
        if client is not None:
            await client.close()


async def small_session(n: int, port: int, size: int, tag: str, stop: asyncio.Event, phase: Phase) -> None:
    """Send small messages over one connection until ``stop``; time each transaction."""
    count = itertools.count()

    async def one(client: Client) -> None:
        payload = small_message(n * 1_000_000 + next(count), size, tag)
        t0 = time.perf_counter()
        await client.send([RECIPIENT], payload)
        phase.latencies.append(time.perf_counter() - t0)
        phase.ok += 1

    def failed(text: str) -> None:
        phase.failures[text] += 1

    await session(port, stop, phase, one, failed)


async def big_session(port: int, payload: bytes, stop: asyncio.Event, phase: Phase) -> None:
    """Stream the big message back to back until ``stop``; the transfer in flight is finished."""
    started = [time.perf_counter()]

    async def one(client: Client) -> None:
        started[0] = time.perf_counter()
        await client.command("MAIL", b"MAIL FROM:<big-sender@client.example.net>\r\n", 2)
        await client.command("RCPT", b"RCPT TO:<" + RECIPIENT.encode() + b">\r\n", 2)
        await client.command("DATA", b"DATA\r\n", 3)
        reply = await client.stream("message", payload, 2, BIG_CHUNK)
        phase.big.append({"seconds": round(time.perf_counter() - started[0], 3),
                          "reply": reply.decode("ascii", "replace").strip(), "ok": True})

    def failed(text: str) -> None:
        phase.big.append({"seconds": round(time.perf_counter() - started[0], 3), "reply": text, "ok": False})
        phase.failures[f"big: {text}"] += 1

    await session(port, stop, phase, one, failed)


async def run_phase(name: str, port: int, server_pid: int, args: argparse.Namespace, seconds: float,
                    big: bytes | None) -> Phase:
    phase = Phase(name)
    stop = asyncio.Event()
    lag = LoopLag()
    lag.start()
    cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
    small = [asyncio.ensure_future(small_session(n, port, args.size, name, stop, phase))
             for n in range(args.sessions)]
    streamer = asyncio.ensure_future(big_session(port, big, stop, phase)) if big is not None else None
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*small)
    phase.seconds = time.perf_counter() - t0  # the small sessions' window: msg/s and CPU are over it
    phase.server_cpu = 100 * (cpu_seconds(server_pid) - cpu0) / phase.seconds
    if streamer is not None:
        await streamer  # the big transfer in flight is finished and counted
    phase.client_lag = await lag.stop()
    return phase


# -- results --------------------------------------------------------------------------


def phase_row(p: Phase) -> dict[str, Any]:
    return {
        "phase": p.name, "messages": p.ok, "failed": sum(p.failures.values()),
        "rate": p.ok / p.seconds if p.seconds else 0.0, "seconds": round(p.seconds, 3),
        **{f"{k}_ms": v for k, v in percentiles_ms(p.latencies).items()},
        "server_cpu": p.server_cpu, "client_lag": p.client_lag,
        "big_transfers": p.big, "failures": dict(p.failures),
    }


def check_maildir(workdir: Path, accepted: int) -> dict[str, Any]:
    def count(d: Path, suffix: str = "") -> int:
        try:
            return sum(1 for n in os.listdir(d) if n.endswith(suffix) and not n.startswith("."))
        except FileNotFoundError:
            return 0

    maildir = workdir / "mail" / "alice"
    new, tmp, spooled = count(maildir / "new"), count(maildir / "tmp"), count(workdir / "spool", ".json")
    return {"accepted": accepted, "maildir_new": new, "maildir_tmp": tmp, "spool_entries": spooled,
            "ok": new == accepted and tmp == 0 and spooled == 0}


def _f(x: float, width: int = 8) -> str:
    return f"{'-':>{width}}" if x != x else f"{x:{width}.1f}"


def print_report(rows: list[dict[str, Any]], ratio: float, args: argparse.Namespace, small_bytes: int,
                 big_bytes: int, check: dict[str, Any], server_exit: int) -> None:
    print(f"\nsmall messages of {small_bytes} bytes from {args.sessions} sessions on reused connections, "
          f"{args.duration:g} s per phase; loop {loop_name()}, {os.cpu_count()} CPUs")
    print("latency = one whole transaction: MAIL FROM written .. 250 after DATA read (MAIL, RCPT, DATA, payload)")
    head = (f"{'phase':22} {'msgs':>6} {'msg/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'srv CPU':>7} {'cli lag':>8} {'failed':>6}")
    print(head)
    print("-" * len(head))
    labels = {"a": "a alone", "b": f"b + {big_bytes / 2**20:.0f} MB stream"}
    for r in rows:
        print(f"{labels[r['phase']]:22} {r['messages']:6d} {r['rate']:7.1f} {_f(r['p50_ms'])} {_f(r['p90_ms'])} "
              f"{_f(r['p99_ms'])} {_f(r['max_ms'])} {_f(r['server_cpu'], 6)}% {_f(r['client_lag']['max_ms'])} "
              f"{r['failed']:6d}")
    verdict = "within" if ratio == ratio and ratio <= 3 else "OVER"
    print(f"ratio p99(b)/p99(a): {ratio:.2f} ({verdict} the target of 3)")
    big = next(r for r in rows if r["phase"] == "b")["big_transfers"]
    ok = sum(1 for b in big if b["ok"])
    secs = ", ".join(f"{b['seconds']:.2f}" for b in big)
    print(f"big transfers in phase b: {len(big)} of {big_bytes} bytes, {ok} got 250; seconds each: {secs}")
    for b in big:
        if not b["ok"]:
            print(f"  big transfer failed: {b['reply']}")
    for r in rows:
        for text, n in list(r["failures"].items())[:MAX_SHOWN_FAILURES]:
            print(f"  failure in phase {r['phase']} x{n}: {text}")
    verdict = "OK" if check["ok"] else "MISMATCH"
    print(f"maildir check: {check['maildir_new']} files in new/ for {check['accepted']} accepted, "
          f"{check['maildir_tmp']} in tmp/, {check['spool_entries']} spool entries: {verdict}")
    if server_exit != 0:
        print(f"monomail exited with {server_exit}; see its log (--keep)")


# -- main -----------------------------------------------------------------------------


async def amain(args: argparse.Namespace, workdir: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    port = free_port(HOST)
    config = write_monomail_config(
        workdir, hostname="latency.example.test", listen=f"{HOST}:{port}",
        max_connections=max(100, 2 * args.sessions + 10), user="alice",
        server_extra=f"max_message_size = {args.big_size + 4 * 2**20}\n")
    progress(f"monomail: starting on {HOST}:{port}")
    proc = start_server([sys.executable, "-m", "monomail", "serve", "-c", str(config)], HOST, port, workdir,
                        "monomail", procs, label="monomail serve", where=f"port {port}")
    big = big_message(args.big_size)
    small_bytes = len(small_message(0, args.size, "a")) - 3
    accepted = 0
    try:
        if args.warmup > 0:
            warm = await run_phase("warm-up", port, proc.pid, args, args.warmup, None)
            accepted += warm.ok
            progress(f"  warm-up: {warm.ok} messages, {sum(warm.failures.values())} failed")
        phases = []
        for name, with_big in (("a", False), ("b", True)):
            progress(f"  phase {name}: {args.duration:g} s{' with the big stream' if with_big else ''}")
            phase = await run_phase(name, port, proc.pid, args, args.duration, big if with_big else None)
            accepted += phase.ok + sum(1 for b in phase.big if b["ok"])
            phases.append(phase)
            if proc.poll() is not None:
                raise RuntimeError(f"monomail died (exit {proc.returncode})")
    finally:
        server_exit = stop_server(proc)
    check = check_maildir(workdir, accepted)
    rows = [phase_row(p) for p in phases]
    ratio = rows[1]["p99_ms"] / rows[0]["p99_ms"] if rows[0]["p99_ms"] else float("nan")
    failed = sum(r["failed"] for r in rows)
    big_ok = bool(rows[1]["big_transfers"]) and all(b["ok"] for b in rows[1]["big_transfers"])
    ok = failed == 0 and big_ok and check["ok"] and server_exit == 0
    if args.max_ratio is not None and not ratio <= args.max_ratio:
        ok = False
    if args.json:
        print(json.dumps(finite({
            "settings": {"duration": args.duration, "sessions": args.sessions, "size": args.size,
                         "message_bytes": small_bytes, "big_size": len(big) - 3, "warmup": args.warmup,
                         "loop": loop_name(), "cpus": os.cpu_count(),
                         "latency": "MAIL FROM written .. 250 after DATA read, reused connection"},
            "phases": rows, "ratio_p99": ratio, "target_ratio": 3, "within_target": ratio <= 3,
            "maildir_check": check, "server_exit": server_exit, "ok": ok,
        }), indent=2))
    else:
        print_report(rows, ratio, args, small_bytes, len(big) - 3, check, server_exit)
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument("--sessions", type=int, default=10, help="concurrent small-message sessions (default 10)")
    p.add_argument("--size", type=int, default=2048, help="approximate small message size in bytes (default 2048)")
    p.add_argument("--big-size", type=int, default=20 * 2**20, help="big message size in bytes (default 20 MiB)")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds of small load first (default 2)")
    p.add_argument("--max-ratio", type=float, help="also exit 1 if p99(b)/p99(a) is above this")
    add_output_options(p, "keep the temporary directory (config, logs, Maildir)")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--sessions must be at least 1, --duration positive, --warmup not negative")
    if args.size < 512 or args.big_size < 65536:
        p.error("--size must be at least 512 and --big-size at least 65536")
    return args



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("latency", "monomail-latency-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs))


if __name__ == "__main__":
    sys.exit(main())
