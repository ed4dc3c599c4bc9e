"""SMTP throughput benchmark: monomail against a bare aiosmtpd sink.

What it measures: messages per second accepted over SMTP on 127.0.0.1, for

- ``sink``: a bare ``aiosmtpd.smtp.SMTP`` server whose ``handle_DATA`` answers
  ``250 OK`` at once and stores nothing (the cost of aiosmtpd's protocol alone), run
  in a subprocess with the same event loop choice as monomail (uvloop if importable)
  and started with ``loop.create_server``;
- ``monomail``: ``python -m monomail serve -c <tmp>/monomail.toml`` in a subprocess,
  delivering every message durably (fsync) into one local Maildir user.

Each target is measured in two modes: ``fresh`` (a new connection per message:
connect, banner, EHLO, MAIL, RCPT, DATA, QUIT) and ``reuse`` (each of the M sessions
sends its share over one connection, MAIL/RCPT/DATA repeated). Each measurement is
repeated ``--rounds`` times and the median is reported, with the ratio
monomail/sink per mode. After the monomail runs, the Maildir must hold exactly as
many files as messages were sent to it, and the spool must be empty.

The load generator is this process: raw asyncio streams (uvloop if importable),
lock-step SMTP without pipelining, messages built before the clock starts. The
servers run in subprocesses so the client and server each get a core. CPU use of
both sides is sampled per run so you can see which side is saturated.

Usage::

    python bench/throughput.py [--messages 2000] [--sessions 10] [--size 2048]
                               [--rounds 3] [--json]

Everything listens on 127.0.0.1 only, is bounded in count and time, and every
subprocess is killed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from _common import (
    RunStats,
    Tally,
    add_output_options,
    add_round_options,
    cpu_seconds,
    data_payload,
    finite,
    free_port,
    latency_ms,
    loop_name,
    message_lines,
    new_parser,
    print_failures,
    progress,
    run_benchmark,
    run_sessions,
    serve_sink_until_signalled,
    start_server,
    stop_server,
    summary_row,
    write_monomail_config,
)

HOST = "127.0.0.1"
MODES = ("fresh", "reuse")
TARGETS = ("sink", "monomail")
RECIPIENT = "alice@example.test"
REPLY_TIMEOUT = 30.0  # seconds one SMTP transaction may take before it counts as failed
MAX_SHOWN_FAILURES = 10


# -- the sink server (runs in a subprocess: ``throughput.py --serve-sink PORT``) ------


class SinkHandler:
    """aiosmtpd handler that accepts and drops every message."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def serve_sink(port: int) -> None:
    await serve_sink_until_signalled(HOST, port, "sink.example.test", SinkHandler())


# -- messages -------------------------------------------------------------------------


def build_message(index: int, size: int, tag: str) -> bytes:
    """One plain-text message of about ``size`` bytes, dot-stuffed, CRLF, ending in '.'."""
    return data_payload(message_lines(index, size, tag, "Alice Example <alice@example.test>", "Hello Alice,"))


# -- the load generator ---------------------------------------------------------------


@dataclass
class Run(RunStats):
    server_cpu: float  # percent of one core
    client_cpu: float
    failures: dict[str, int]


async def measure(target: str, mode: str, port: int, server_pid: int, messages: int, sessions: int,
                  size: int, tag: str, deadline: float) -> Run:
    jobs = [([RECIPIENT], build_message(i, size, tag)) for i in range(messages)]
    tally = Tally()
    srv0, cli0 = cpu_seconds(server_pid), time.process_time()
    elapsed = await run_sessions(HOST, port, mode, jobs, sessions, deadline, REPLY_TIMEOUT, tally)
    srv1, cli1 = cpu_seconds(server_pid), time.process_time()
    p50_ms, p99_ms = latency_ms(tally.latencies)
    return Run(
        target=target, mode=mode, messages=messages, ok=tally.ok, failed=sum(tally.failures.values()),
        seconds=round(elapsed, 4), rate=tally.ok / elapsed if elapsed else 0.0, p50_ms=p50_ms, p99_ms=p99_ms,
        server_cpu=100 * (srv1 - srv0) / elapsed, client_cpu=100 * (cli1 - cli0) / elapsed,
        failures=dict(tally.failures),
    )


# -- servers ------------------------------------------------------------------------


def monomail_config(directory: Path, port: int, sessions: int) -> Path:
    return write_monomail_config(directory, hostname="bench.example.test", listen=f"{HOST}:{port}",
                                 max_connections=max(100, 2 * sessions + 10), user="alice")


# -- the benchmark --------------------------------------------------------------------


async def bench_target(target: str, port: int, proc: subprocess.Popen[bytes],
                       args: argparse.Namespace) -> tuple[list[Run], int]:
    """Warm up, then every (round, mode). Returns the runs and the messages accepted."""
    accepted = 0
    for mode in MODES:
        warm = await measure(target, mode, port, proc.pid, args.warmup, args.sessions, args.size, "warmup",
                             args.max_seconds)
        accepted += warm.ok
        if warm.failed:
            progress(f"  warm-up {target}/{mode}: {warm.failed} failed: {_first(warm.failures)}")
    runs = []
    for r in range(args.rounds):
        for mode in MODES:
            run = await measure(target, mode, port, proc.pid, args.messages, args.sessions, args.size,
                                f"r{r}{mode[0]}", args.max_seconds)
            accepted += run.ok
            runs.append(run)
            progress(f"  {target:8} {mode:5} round {r + 1}/{args.rounds}: {run.rate:8.1f} msg/s "
                     f"({run.ok}/{run.messages} ok in {run.seconds:.2f}s, server CPU {run.server_cpu:.0f}%, "
                     f"client CPU {run.client_cpu:.0f}%)")
            if proc.poll() is not None:
                raise RuntimeError(f"{target} server died (exit {proc.returncode})")
    return runs, accepted


def _first(failures: dict[str, int]) -> str:
    return next(iter(failures), "")


def check_maildir(workdir: Path, sent: int, accepted: int) -> dict[str, Any]:
    maildir = workdir / "mail" / "alice"
    spool = workdir / "spool"

    def count(d: Path, suffix: str = "") -> int:
        try:
            return sum(1 for n in os.listdir(d) if n.endswith(suffix) and not n.startswith("."))
        except FileNotFoundError:
            return 0

    new, tmp, spooled = count(maildir / "new"), count(maildir / "tmp"), count(spool, ".json")
    return {
        "sent": sent, "accepted": accepted, "maildir_new": new, "maildir_tmp": tmp, "spool_entries": spooled,
        "ok": new == sent == accepted and tmp == 0 and spooled == 0,
    }


def summarize(runs: list[Run]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for target in TARGETS:
        for mode in MODES:
            rs = [r for r in runs if r.target == target and r.mode == mode]
            if rs:
                out[(target, mode)] = summary_row(target, mode, rs, ("server_cpu", "client_cpu"))
    return out


def print_table(summary: dict[tuple[str, str], dict[str, Any]], out: TextIO) -> None:
    head = f"{'target':9} {'mode':6} {'msgs/s':>8} {'min-max':>15} {'p50 ms':>7} {'p99 ms':>7} " \
           f"{'srv CPU':>7} {'cli CPU':>7} {'failed':>6}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for s in summary.values():
        span = f"{s['min_rate']:.0f}-{s['max_rate']:.0f}"
        print(f"{s['target']:9} {s['mode']:6} {s['median_rate']:8.1f} {span:>15} {s['p50_ms']:7.2f} "
              f"{s['p99_ms']:7.2f} {s['server_cpu']:6.0f}% {s['client_cpu']:6.0f}% {s['failed']:6d}", file=out)
    for mode in MODES:
        if ("sink", mode) in summary and ("monomail", mode) in summary:
            ratio = summary[("monomail", mode)]["median_rate"] / summary[("sink", mode)]["median_rate"]
            print(f"ratio monomail/sink, {mode:5}: {ratio:.2f}", file=out)
    print_failures(summary.values(), out, MAX_SHOWN_FAILURES)


async def amain(args: argparse.Namespace, workdir: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    runs: list[Run] = []
    check: dict[str, Any] | None = None
    server_exit: dict[str, int] = {}
    for target in args.targets:
        port = free_port(HOST)
        if target == "sink":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-sink", str(port)]
        else:
            cmd = [sys.executable, "-m", "monomail", "serve", "-c",
                   str(monomail_config(workdir, port, args.sessions))]
        progress(f"{target}: starting on {HOST}:{port}")
        proc = start_server(cmd, HOST, port, workdir, target, procs, label="server", where=f"port {port}")
        try:
            target_runs, accepted = await bench_target(target, port, proc, args)
        finally:
            server_exit[target] = stop_server(proc)
        runs += target_runs
        if target == "monomail":
            sent = (args.warmup + args.messages * args.rounds) * len(MODES)
            check = check_maildir(workdir, sent, accepted)
            progress(f"monomail: stopped (exit {server_exit[target]})")

    summary = summarize(runs)
    ok = all(s["failed"] == 0 for s in summary.values()) and (check is None or check["ok"])
    ok = ok and all(code == 0 for code in server_exit.values())
    ratios = {
        mode: summary[("monomail", mode)]["median_rate"] / summary[("sink", mode)]["median_rate"]
        for mode in MODES if ("sink", mode) in summary and ("monomail", mode) in summary
    }
    if args.json:
        print(json.dumps(finite({
            "settings": {"messages": args.messages, "sessions": args.sessions, "size": args.size,
                         "rounds": args.rounds, "warmup": args.warmup, "loop": loop_name(),
                         "message_bytes": len(build_message(0, args.size, "r0f")) - 3,
                         "cpus": os.cpu_count()},
            "results": list(summary.values()),
            "ratios": ratios,
            "maildir_check": check,
            "server_exit": server_exit,
            "runs": [asdict(r) for r in runs],
            "ok": ok,
        }), indent=2))
    else:
        size = len(build_message(0, args.size, "r0f")) - 3
        print(f"\n{args.messages} messages of {size} bytes, {args.sessions} sessions, median of {args.rounds} "
              f"rounds, loop {loop_name()}, {os.cpu_count()} CPUs")
        print_table(summary, sys.stdout)
        if check is not None:
            verdict = "OK" if check["ok"] else "MISMATCH"
            print(f"maildir check: {check['maildir_new']} files in new/ for {check['sent']} messages sent "
                  f"({check['accepted']} accepted), {check['maildir_tmp']} in tmp/, "
                  f"{check['spool_entries']} spool entries: {verdict}")
        for target, code in server_exit.items():
            if code != 0:
                print(f"{target} server exited with {code}; see its log")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    add_round_options(p, "untimed messages per mode before timing (default 50)")
    p.add_argument("--target", dest="targets", action="append", choices=TARGETS,
                   help="measure only this target (repeatable; default both)")
    add_output_options(p, "keep the temporary directory (logs, Maildir)")
    args = p.parse_args(argv)
    for name in ("messages", "sessions", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.size < 512 or args.warmup < 0:
        p.error("--size must be at least 512 and --warmup not negative")
    args.targets = args.targets or list(TARGETS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("throughput", "monomail-bench-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs), serve_sink)


if __name__ == "__main__":
    sys.exit(main())
