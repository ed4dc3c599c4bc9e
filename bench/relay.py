"""Relay benchmark: monomail passing mail on to a remote SMTP sink, beside that sink alone.

What it measures: messages per second a trusted client (127.0.0.1) gets accepted when
every recipient is at a remote domain (``sink.test``), so monomail relays each message,
during DATA (cut-through), to a "remote" sink on 127.0.0.2:

- ``baseline``: the load generator sends straight to the sink: what the sink alone takes;
- ``mx``: load generator → monomail → sink, routed by DNS: ``tests/peers.DNSServer`` on
  127.0.0.1 answers ``sink.test MX 10 mx.sink.test`` and ``mx.sink.test A 127.0.0.2``;
  monomail's ``dns.nameservers`` points at it and ``remote.port`` is the sink's port;
- ``smarthost``: the same, but ``remote.smarthost = "127.0.0.2:PORT"`` (no DNS).

The sink is a bare ``aiosmtpd.smtp.SMTP`` server in a subprocess (uvloop if importable)
whose ``handle_DATA`` counts the message and answers ``250 OK``; it stores nothing. It
answers an extra ``XCOUNT`` command with its counters, so after every run the benchmark
checks that the sink got exactly the messages sent, and that monomail's spool holds no
``*.json`` entry (everything delivered at once, nothing queued for retry).

Each route is measured in two modes: ``reuse`` (each of the M sessions sends its share
over one connection) and ``fresh`` (a new client connection per message). monomail's own
connections to the sink are cached in both modes (``remote.connection_idle``). Rounds
are interleaved (round 1 of every route, then round 2, ...) and the median of
``--rounds`` is reported, with the ratio monomail/baseline per route and mode.

Optional comparison with Postfix's test tools, when ``/usr/sbin/smtp-source`` and
``/usr/sbin/smtp-sink`` exist (Postfix itself is not needed): ``smtp-sink`` (C, event
driven) is the remote sink and ``smtp-source`` the load generator, sending the same
message text (``-F``):

- ``pf-direct``: smtp-source → smtp-sink;
- ``pf-relay``: smtp-source → monomail (smarthost = smtp-sink) → smtp-sink.

The smtp-source run is timed as a whole; smtp-sink's message counter (``-c``) is checked
as above. The section is skipped with a note when the tools are missing.

The load generator is this process: raw asyncio streams (uvloop if importable),
lock-step SMTP without pipelining, messages built before the clock starts. CPU use of
monomail (``relay``), the sink and the client is sampled per run.

Usage::

    python bench/relay.py [--messages 2000] [--sessions 10] [--size 2048] [--rounds 3]
                          [--route mx|smarthost] [--mode reuse|fresh] [--no-postfix] [--json]

Everything listens on 127.0.0.1 / 127.0.0.2 only, each measurement is bounded by
``--max-seconds``, and every subprocess is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from _common import (
    EHLO_NAME,
    ERRORS,
    SENDER,
    Client,
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
    new_parser,
    print_failures,
    progress,
    run_benchmark,
    run_sessions,
    serve_counting_sink,
    start_server,
    stop_server,
    summary_row,
    write_monomail_config,
)
from _common import message_lines as _message_lines

CLIENT_HOST = "127.0.0.1"  # monomail and the DNS server listen here
SINK_HOST = "127.0.0.2"  # the "remote" sinks listen here
SINK_DOMAIN = "sink.test"
MX_NAME = "mx.sink.test"
MODES = ("reuse", "fresh")
ROUTES = ("mx", "smarthost")
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
REPLY_TIMEOUT = 60.0  # one SMTP transaction; above monomail's cut_through (30s)
SETTLE_TIMEOUT = 10.0  # after a run, how long the checks wait for late deliveries
MAX_SHOWN = 8


# -- the sink (runs in a subprocess: ``relay.py --serve-sink PORT``) --------------------


class CountingSink:
    """aiosmtpd handler that counts and drops every message."""

    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        self.recipients += len(envelope.rcpt_tos)
        return "250 OK"

    def counts(self) -> tuple[int, int]:
        return self.messages, self.recipients


async def serve_sink(port: int) -> None:
    await serve_counting_sink(SINK_HOST, port, CountingSink())


# -- messages -------------------------------------------------------------------------


def recipients_for(index: int, count: int) -> list[str]:
    return [f"user{(index * count + j) % 1000}@{SINK_DOMAIN}" for j in range(count)]


def message_lines(index: int, size: int, tag: str, rcpts: list[str]) -> list[str]:
    """One plain-text message of about ``size`` bytes (CRLF counted), as lines."""
    return _message_lines(index, size, tag, f"<{rcpts[0]}>", "Hello,")


def build_message(index: int, size: int, tag: str, rcpts: list[str]) -> bytes:
    """The DATA payload: dot-stuffed, CRLF, ending in '.'."""
    return data_payload(message_lines(index, size, tag, rcpts))


# -- counting what arrived ------------------------------------------------------------


Counts = tuple[int, int | None]  # messages, recipients (None: the sink does not count them)


async def aiosmtpd_sink_count(port: int) -> Counts:
    """Messages and recipients the aiosmtpd sink has taken so far (its XCOUNT command)."""
    client = Client(SINK_HOST, port)
    try:
        async with asyncio.timeout(10):
            await client.open(ehlo=False)
            text = (await client.command("XCOUNT", b"XCOUNT\r\n", 2)).decode("ascii", "replace")
            with contextlib.suppress(*ERRORS):
                await client.command("QUIT", b"QUIT\r\n", 2)
    finally:
        await client.close()
    words = text.split()
    return int(words[1]), int(words[2])


_MESG = re.compile(rb"mesg=(\d+)")


def smtp_sink_count(counter_file: Path) -> Counts:
    """Messages smtp-sink has taken so far: the last ``mesg=N`` of its ``-c`` output."""
    try:
        with counter_file.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
            found = _MESG.findall(f.read())
    except OSError:
        return 0, None
    return (int(found[-1]) if found else 0), None


def spool_entries(spool: Path | None) -> int | None:
    if spool is None:
        return None
    try:
        return sum(1 for n in os.listdir(spool) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return 0


# -- targets and runs -----------------------------------------------------------------


@dataclass
class Target:
    """Where the load goes and how to check what arrived."""

    name: str
    host: str
    port: int
    sink_pid: int
    sink_count: Callable[[], Awaitable[Counts]]
    relay: subprocess.Popen[bytes] | None = None  # monomail, if it is in the path
    spool: Path | None = None
    smtp_source: bool = False  # load from Postfix's smtp-source instead of this process


@dataclass
class Run(RunStats):
    relay_cpu: float  # percent of one core; NaN without monomail in the path
    sink_cpu: float
    client_cpu: float
    sink_got: int  # messages the sink counted during the run (after settling)
    sink_rcpts: int | None  # recipients in them (aiosmtpd sink only)
    spool_left: int | None  # *.json entries in monomail's spool afterwards
    settle_s: float  # how long after the client finished the checks took to pass
    check_ok: bool
    failures: dict[str, int]


Settled = tuple[int, int | None, int | None, float]  # messages, recipients, spool entries, seconds waited


async def _settle(target: Target, before: Counts, messages: int) -> Settled:
    """Sink count deltas and spool entries, waiting (bounded) for late deliveries."""
    t0 = time.perf_counter()
    while True:
        now = await target.sink_count()
        got = now[0] - before[0]
        rcpts = None if now[1] is None or before[1] is None else now[1] - before[1]
        left = spool_entries(target.spool)
        waited = time.perf_counter() - t0
        if (got >= messages and not left) or waited > SETTLE_TIMEOUT:
            return got, rcpts, left, waited
        await asyncio.sleep(0.1)


def _make_run(target: Target, mode: str, messages: int, ok: int, failures: collections.Counter[str],
              elapsed: float, latencies: list[float], cpu: tuple[float, float, float],
              settled: Settled, per_message: int) -> Run:
    p50_ms, p99_ms = latency_ms(latencies)
    got, rcpts, left, waited = settled
    failed = sum(failures.values())
    return Run(
        target=target.name, mode=mode, messages=messages, ok=ok, failed=failed,
        seconds=round(elapsed, 4), rate=ok / elapsed if elapsed else 0.0, p50_ms=p50_ms, p99_ms=p99_ms,
        relay_cpu=100 * cpu[0] / elapsed, sink_cpu=100 * cpu[1] / elapsed, client_cpu=100 * cpu[2] / elapsed,
        sink_got=got, sink_rcpts=rcpts, spool_left=left, settle_s=round(waited, 3),
        check_ok=failed == 0 and ok == messages == got and not left and rcpts in (None, got * per_message),
        failures=dict(failures),
    )


async def measure(target: Target, mode: str, args: argparse.Namespace, tag: str, messages: int) -> Run:
    """The load generator of this process against ``target``."""
    jobs = [(rc, build_message(i, args.size, tag, rc))
            for i in range(messages) for rc in [recipients_for(i, args.recipients)]]
    tally = Tally()
    before = await target.sink_count()
    relay_pid = target.relay.pid if target.relay else None
    r0, s0, c0 = cpu_seconds(relay_pid), cpu_seconds(target.sink_pid), time.process_time()
    elapsed = await run_sessions(target.host, target.port, mode, jobs, args.sessions, args.max_seconds,
                                 REPLY_TIMEOUT, tally)
    cpu = (cpu_seconds(relay_pid) - r0, cpu_seconds(target.sink_pid) - s0, time.process_time() - c0)
    settled = await _settle(target, before, messages)
    return _make_run(target, mode, messages, tally.ok, tally.failures, elapsed, tally.latencies, cpu, settled,
                     args.recipients)


async def measure_smtp_source(target: Target, mode: str, args: argparse.Namespace, message_file: Path,
                              messages: int) -> Run:
    """Postfix's smtp-source against ``target``, timed as a whole."""
    cmd = [SMTP_SOURCE, "-s", str(args.sessions), "-m", str(messages), "-F", str(message_file),
           "-M", EHLO_NAME, "-f", SENDER, "-t", f"user@{SINK_DOMAIN}"]
    if args.recipients > 1:
        cmd += ["-r", str(args.recipients)]
    if mode == "reuse":
        cmd.append("-d")
    cmd.append(f"{target.host}:{target.port}")
    failures: collections.Counter[str] = collections.Counter()
    before = await target.sink_count()
    relay_pid = target.relay.pid if target.relay else None
    r0, s0 = cpu_seconds(relay_pid), cpu_seconds(target.sink_pid)
    u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), args.max_seconds)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        failures[f"smtp-source stopped after {args.max_seconds:.0f}s (--max-seconds)"] += 1
    elapsed = time.perf_counter() - t0
    u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_seconds(relay_pid) - r0, cpu_seconds(target.sink_pid) - s0,
           (u1.ru_utime + u1.ru_stime) - (u0.ru_utime + u0.ru_stime))
    settled = await _settle(target, before, messages)
    if proc.returncode != 0 and not failures:
        text = out.decode("utf-8", "replace").strip().splitlines()
        failures[f"smtp-source exit {proc.returncode}: {(text or [''])[-1][:160]}"] += 1
    # smtp-source reports no per-message results: without failures all were accepted;
    # with one, count what reached the sink.
    ok = messages if not failures else min(settled[0], messages)
    if failures:
        failures[next(iter(failures))] = max(messages - ok, 1)
    return _make_run(target, mode, messages, ok, failures, elapsed, [], cpu, settled, args.recipients)


# -- servers ------------------------------------------------------------------------


def monomail_config(directory: Path, port: int, args: argparse.Namespace, *, dns: str,
                    smarthost: str = "", remote_port: int = 25) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    route = f'smarthost = "{smarthost}"' if smarthost else f"port = {remote_port}"
    return write_monomail_config(
        directory, hostname="relay.example.test", listen=f"{CLIENT_HOST}:{port}",
        max_connections=max(100, 2 * args.sessions + 10), user="postmaster",
        server_extra=f"max_recipients = {max(100, args.recipients)}\n",
        sections=f"""\
[dns]
nameservers = ["{dns}"]
timeout = "5s"

[remote]
{route}
tls = "opportunistic"
max_connections = {max(50, args.sessions)}
max_connections_per_domain = {max(10, args.sessions)}

""")


def start_monomail(name: str, workdir: Path, args: argparse.Namespace, procs: list[subprocess.Popen[bytes]],
                   **route: Any) -> tuple[subprocess.Popen[bytes], int, Path]:
    directory = workdir / name
    port = free_port(CLIENT_HOST)
    config = monomail_config(directory, port, args, **route)
    progress(f"{name}: monomail on {CLIENT_HOST}:{port}")
    proc = start_server([sys.executable, "-m", "monomail", "serve", "-c", str(config)], CLIENT_HOST, port,
                        directory, "monomail", procs)
    return proc, port, directory


def log_problems(directory: Path) -> list[str]:
    """WARNING / ERROR lines of a monomail run (its log file and its stderr)."""
    lines: list[str] = []
    for name in ("monomail-log.txt", "monomail.log"):
        with contextlib.suppress(OSError):
            lines += [x for x in (directory / name).read_text(errors="replace").splitlines()
                      if " WARNING " in x or " ERROR " in x or "Traceback" in x]
    return lines


def dns_server_class() -> Any:
    """tests/peers.DNSServer (the tests folder is not a package)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from peers import DNSServer

    return DNSServer


def postfix_tools() -> bool:
    return all(os.access(p, os.X_OK) for p in (SMTP_SOURCE, SMTP_SINK))


# -- the benchmark --------------------------------------------------------------------


def _report_run(run: Run, label: str) -> None:
    spool = "" if run.spool_left is None else f", spool {run.spool_left}"
    rcpts = "" if run.sink_rcpts is None else f" ({run.sink_rcpts} rcpts)"
    late = f", settled after {run.settle_s:.1f}s" if run.settle_s >= 0.2 else ""
    verdict = "OK" if run.check_ok else "MISMATCH"
    progress(f"  {run.target:9} {run.mode:5} {label}: {run.rate:8.1f} msg/s ({run.ok}/{run.messages} ok in "
             f"{run.seconds:.2f}s; CPU relay{_pct(run.relay_cpu)} sink{_pct(run.sink_cpu)} client"
             f"{_pct(run.client_cpu)}) check: sink +{run.sink_got}{rcpts}{spool}{late}: {verdict}")
    for text, n in list(run.failures.items())[:3]:
        progress(f"      failed x{n}: {text}")


async def run_rounds(targets: list[Target], args: argparse.Namespace, message_file: Path | None) -> list[Run]:
    """Warm-ups (untimed, still checked), then every (round, mode, target). Returns every run."""
    runs: list[Run] = []

    async def one(target: Target, mode: str, tag: str, messages: int) -> Run:
        if target.smtp_source:
            assert message_file is not None
            run = await measure_smtp_source(target, mode, args, message_file, messages)
        else:
            run = await measure(target, mode, args, tag, messages)
        if target.relay is not None and target.relay.poll() is not None:
            raise RuntimeError(f"{target.name}: monomail died (exit {target.relay.returncode})")
        return run

    if args.warmup:
        for mode in args.modes:
            for target in targets:
                run = await one(target, mode, "warmup", args.warmup)
                _report_run(run, "warm-up  ")
                runs.append(dataclass_replace(run, target=f"{run.target}:warmup"))
    for r in range(args.rounds):
        for mode in args.modes:
            for target in targets:
                run = await one(target, mode, f"r{r}{mode[0]}", args.messages)
                _report_run(run, f"round {r + 1}/{args.rounds}")
                runs.append(run)
    return runs


def dataclass_replace(run: Run, **changes: Any) -> Run:
    return Run(**{**asdict(run), **changes})


def summarize(runs: list[Run], names: list[str], modes: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        for mode in modes:
            rs = [r for r in runs if r.target == name and r.mode == mode]
            if rs:
                out.append(summary_row(name, mode, rs, ("relay_cpu", "sink_cpu", "client_cpu"),
                                       {"checks_ok": sum(r.check_ok for r in rs), "checks": len(rs)}))
    return out


def ratios(summary: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> dict[str, float]:
    by = {(s["target"], s["mode"]): s["median_rate"] for s in summary}
    out = {}
    for num, den in pairs:
        for mode in MODES:
            if (num, mode) in by and by.get((den, mode)):
                out[f"{num}/{den} {mode}"] = by[(num, mode)] / by[(den, mode)]
    return out


def _pct(x: float) -> str:
    return "    -" if x != x else f"{x:4.0f}%"


def _ms(x: float) -> str:
    return "      -" if x != x else f"{x:7.2f}"


def print_table(summary: list[dict[str, Any]], out: TextIO) -> None:
    head = (f"{'target':10} {'mode':5} {'msgs/s':>8} {'min-max':>11} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'relay':>5} {'sink':>5} {'cli':>5} {'failed':>6} {'checks':>6}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for s in summary:
        span = f"{s['min_rate']:.0f}-{s['max_rate']:.0f}"
        checks = f"{s['checks_ok']}/{s['checks']}"
        print(f"{s['target']:10} {s['mode']:5} {s['median_rate']:8.1f} {span:>11} {_ms(s['p50_ms'])} "
              f"{_ms(s['p99_ms'])} {_pct(s['relay_cpu'])} {_pct(s['sink_cpu'])} {_pct(s['client_cpu'])} "
              f"{s['failed']:6d} {checks:>6}", file=out)


async def amain(args: argparse.Namespace, workdir: Path, procs: list[subprocess.Popen[bytes]],
                closers: list[Callable[[], None]]) -> int:
    results: dict[str, Any] = {"python": None, "postfix": None}
    relays: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    # -- section 1: this process's load generator, the aiosmtpd sink -------------------
    sink_port = free_port(SINK_HOST)
    progress(f"sink: aiosmtpd on {SINK_HOST}:{sink_port}")
    sink = start_server([sys.executable, str(Path(__file__).resolve()), "--serve-sink", str(sink_port)],
                        SINK_HOST, sink_port, workdir / "sink", "sink", procs)

    def count_sink() -> Awaitable[Counts]:
        return aiosmtpd_sink_count(sink_port)

    targets = [Target("baseline", SINK_HOST, sink_port, sink.pid, count_sink)]
    dns_server = None
    if "mx" in args.routes:
        dns_server = dns_server_class()(CLIENT_HOST)
        dns_server.start()
        closers.append(dns_server.stop)
        dns_server.mx(SINK_DOMAIN, (10, MX_NAME))
        dns_server.a(MX_NAME, SINK_HOST)
        progress(f"dns: {SINK_DOMAIN} MX {MX_NAME}, A {SINK_HOST} on {dns_server.address}")
        proc, port, directory = start_monomail("mx", workdir, args, procs, dns=dns_server.address,
                                               remote_port=sink_port)
        relays["mx"] = (proc, directory)
        targets.append(Target("mx", CLIENT_HOST, port, sink.pid, count_sink, proc, directory / "spool"))
    if "smarthost" in args.routes:
        # nameservers: an unused loopback port, so nothing could ever reach a real resolver
        proc, port, directory = start_monomail("smarthost", workdir, args, procs,
                                               dns=f"{CLIENT_HOST}:{free_port(CLIENT_HOST)}",
                                               smarthost=f"{SINK_HOST}:{sink_port}")
        relays["smarthost"] = (proc, directory)
        targets.append(Target("smarthost", CLIENT_HOST, port, sink.pid, count_sink, proc, directory / "spool"))
    runs = await run_rounds(targets, args, None)
    names = [t.name for t in targets]
    summary = summarize(runs, names, args.modes)
    results["python"] = {"summary": summary, "ratios": ratios(summary, [(r, "baseline") for r in args.routes]),
                         "runs": runs}
    if dns_server is not None:
        results["dns_queries"] = len(dns_server.queries)

    # -- section 2: Postfix's smtp-source and smtp-sink ----------------------------------
    postfix_note = ""
    if args.no_postfix:
        postfix_note = "Postfix comparison skipped (--no-postfix)"
    elif not postfix_tools():
        missing = " and ".join(p for p in (SMTP_SOURCE, SMTP_SINK) if not os.access(p, os.X_OK))
        postfix_note = f"Postfix comparison skipped: {missing} not installed"
    else:
        pf_dir = workdir / "smtp-sink"
        pf_dir.mkdir(parents=True, exist_ok=True)
        pf_port = free_port(SINK_HOST)
        counter = pf_dir / "counter.txt"
        cmd = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        cmd += [f"{SINK_HOST}:{pf_port}", "1024"]
        progress(f"smtp-sink on {SINK_HOST}:{pf_port}")
        pf_sink = start_server(cmd, SINK_HOST, pf_port, pf_dir, "smtp-sink", procs, stdout=counter)

        async def count_pf() -> Counts:
            return smtp_sink_count(counter)

        proc, port, directory = start_monomail("pf-relay", workdir, args, procs,
                                               dns=f"{CLIENT_HOST}:{free_port(CLIENT_HOST)}",
                                               smarthost=f"{SINK_HOST}:{pf_port}")
        relays["pf-relay"] = (proc, directory)
        message_file = pf_dir / "message.txt"
        message_file.write_text("\n".join(message_lines(0, args.size, "pf", recipients_for(0, 1))) + "\n")
        pf_targets = [Target("pf-direct", SINK_HOST, pf_port, pf_sink.pid, count_pf, smtp_source=True),
                      Target("pf-relay", CLIENT_HOST, port, pf_sink.pid, count_pf, proc, directory / "spool",
                             smtp_source=True)]
        pf_runs = await run_rounds(pf_targets, args, message_file)
        pf_summary = summarize(pf_runs, [t.name for t in pf_targets], args.modes)
        results["postfix"] = {"summary": pf_summary, "ratios": ratios(pf_summary, [("pf-relay", "pf-direct")]),
                              "runs": pf_runs}

    # -- stop monomail, look at its logs -------------------------------------------------
    server_exit: dict[str, int] = {}
    problems: dict[str, list[str]] = {}
    for name, (proc, directory) in relays.items():
        server_exit[name] = stop_server(proc)
        problems[name] = log_problems(directory)
        left = spool_entries(directory / "spool")
        if left:
            problems[name].append(f"{left} spool entries left at shutdown")

    all_runs = list(results["python"]["runs"]) + (list(results["postfix"]["runs"]) if results["postfix"] else [])
    ok = all(r.check_ok for r in all_runs) and all(c == 0 for c in server_exit.values())
    ok = ok and not any(problems.values())

    size = len(build_message(0, args.size, "r0r", recipients_for(0, 1))) - 3
    if args.json:
        doc = {
            "settings": {"messages": args.messages, "sessions": args.sessions, "size": args.size,
                         "message_bytes": size, "recipients": args.recipients, "rounds": args.rounds,
                         "warmup": args.warmup, "modes": args.modes, "routes": args.routes, "loop": loop_name(),
                         "cpus": os.cpu_count()},
            "ok": ok, "server_exit": server_exit, "log_problems": problems, "postfix_note": postfix_note,
            "dns_queries": results.get("dns_queries"),
        }
        for key in ("python", "postfix"):
            section = results[key]
            if section:
                doc[key] = {"results": section["summary"], "ratios": section["ratios"],
                            "runs": [asdict(r) for r in section["runs"]]}
        print(json.dumps(finite(doc), indent=2))
        return 0 if ok else 1

    out = sys.stdout
    print(f"\n{args.messages} messages of {size} bytes, {args.recipients} recipient(s) each, {args.sessions} "
          f"sessions, median of {args.rounds} rounds, loop {loop_name()}, {os.cpu_count()} CPUs", file=out)
    print("baseline = client -> aiosmtpd sink; mx / smarthost = client -> monomail -> aiosmtpd sink "
          f"({SINK_HOST}); CPU in % of one core", file=out)
    section = results["python"]
    print_table(section["summary"], out)
    for key, value in section["ratios"].items():
        print(f"ratio {key}: {value:.2f}", file=out)
    print_failures(section["summary"], out, MAX_SHOWN)
    if results.get("dns_queries") is not None:
        print(f"DNS queries answered: {results['dns_queries']}", file=out)
    if results["postfix"]:
        section = results["postfix"]
        print("\npf-direct = smtp-source -> smtp-sink; pf-relay = smtp-source -> monomail (smarthost) -> "
              "smtp-sink; smtp-source timed as a whole", file=out)
        print_table(section["summary"], out)
        for key, value in section["ratios"].items():
            print(f"ratio {key}: {value:.2f}", file=out)
        print_failures(section["summary"], out, MAX_SHOWN)
    else:
        print(f"\n{postfix_note}", file=out)
    checked = [r for r in all_runs if r.spool_left is not None]
    bad = [r for r in all_runs if not r.check_ok]
    late = [r for r in checked if r.settle_s >= 0.2]
    print(f"\ncheck after each run (warm-ups too): sink got exactly the messages (and recipients) sent, "
          f"monomail spool has no *.json: {len(all_runs) - len(bad)}/{len(all_runs)} OK"
          + (f"; {len(late)} run(s) needed to settle (queued, not cut-through)" if late else ""), file=out)
    for r in bad[:MAX_SHOWN]:
        print(f"  MISMATCH {r.target}/{r.mode}: sent {r.messages}, accepted {r.ok}, sink got {r.sink_got} "
              f"with {r.sink_rcpts} recipients, spool entries {r.spool_left}", file=out)
    for name, code in server_exit.items():
        lines = problems[name]
        state = "clean log" if not lines else f"{len(lines)} warning/error line(s) in its log"
        print(f"monomail {name}: exit {code}, {state}", file=out)
        for line in lines[:MAX_SHOWN]:
            print(f"    {line[:200]}", file=out)
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    p.add_argument("--recipients", type=int, default=1, help="recipients per message, all at sink.test (default 1)")
    add_round_options(p, "untimed messages per target and mode (default 50)")
    p.add_argument("--route", dest="routes", action="append", choices=ROUTES,
                   help="monomail routing to measure (repeatable; default both)")
    p.add_argument("--mode", dest="modes", action="append", choices=MODES,
                   help="client connection mode (repeatable; default both)")
    p.add_argument("--no-postfix", action="store_true", help="skip the smtp-source / smtp-sink comparison")
    add_output_options(p, "keep the temporary directory (configs, logs)")
    args = p.parse_args(argv)
    for name in ("messages", "sessions", "rounds", "recipients"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.size < 512 or args.warmup < 0 or args.max_seconds <= 0:
        p.error("--size must be at least 512, --warmup not negative, --max-seconds positive")
    args.routes = [r for r in ROUTES if r in (args.routes or ROUTES)]
    args.modes = [m for m in MODES if m in (args.modes or MODES)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("relay", "monomail-relay-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs, closers), serve_sink)


if __name__ == "__main__":
    sys.exit(main())
