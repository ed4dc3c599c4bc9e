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
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, TextIO

HOST = "127.0.0.1"
MODES = ("fresh", "reuse")
TARGETS = ("sink", "monomail")
SENDER = "bench-sender@client.example.net"
RECIPIENT = "alice@example.test"
EHLO_NAME = "client.example.net"
REPLY_TIMEOUT = 30.0  # seconds one SMTP transaction may take before it counts as failed
START_TIMEOUT = 20.0  # seconds a server may take to answer its first banner
MAX_SHOWN_FAILURES = 10

_TEXT = (
    "the quarterly report attached below covers revenue forecasts for the northern region and "
    "includes notes from last week's planning meeting please review the figures before "
    "thursday so we can agree on the budget for next year also remember that the office "
    "will be closed on monday for maintenance of the heating system let me know if you "
    "have questions about the shipment schedule or the new supplier contract we signed"
)
_WORDS = tuple(_TEXT.split())


def run_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` as monomail does: uvloop when importable, else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


# -- the sink server (runs in a subprocess: ``throughput.py --serve-sink PORT``) ------


class SinkHandler:
    """aiosmtpd handler that accepts and drops every message."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def serve_sink(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # as monomail does
    loop = asyncio.get_running_loop()
    handler = SinkHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, decode_data=False, hostname="sink.example.test",
                     ident="ESMTP sink", loop=loop),
        host=HOST, port=port, reuse_address=True, backlog=512,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


# -- messages -------------------------------------------------------------------------


def build_message(index: int, size: int, tag: str) -> bytes:
    """One plain-text message of about ``size`` bytes, dot-stuffed, CRLF, ending in '.'."""
    rng = random.Random(index)
    headers = [
        f"Received: from workstation.example.net (workstation.example.net [192.0.2.{index % 250 + 1}])",
        f"\tby {EHLO_NAME} with ESMTPSA id {tag}{index:06d}; {formatdate(localtime=True)}",
        f"Date: {formatdate(localtime=True)}",
        "From: Bench Sender <bench-sender@client.example.net>",
        "To: Alice Example <alice@example.test>",
        f"Subject: Quarterly figures, part {index} ({tag})",
        f"Message-ID: <{tag}.{index}.{rng.getrandbits(48):012x}@client.example.net>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii; format=flowed",
        "Content-Transfer-Encoding: 7bit",
        "User-Agent: monomail-bench/1.0",
        "",
        "Hello Alice,",
        "",
    ]
    lines = headers
    total = sum(len(x) + 2 for x in lines)
    body_target = max(size - 120, 0)
    line: list[str] = []
    while total < body_target:
        line.append(rng.choice(_WORDS))
        if sum(len(w) + 1 for w in line) > 66:
            text = " ".join(line)
            lines.append(text)
            total += len(text) + 2
            line = []
            if rng.random() < 0.12:
                lines.append("")
                total += 2
    if line:
        lines.append(" ".join(line))
    # a line that needs dot-stuffing, and a signature
    lines += ["", ". (this line starts with a dot)", "", "-- ", "Bench Sender, Example Net"]
    stuffed = ("." + x if x.startswith(".") else x for x in lines)
    return ("\r\n".join(stuffed) + "\r\n.\r\n").encode("ascii")


# -- the load generator ---------------------------------------------------------------


class SMTPFailure(Exception):
    """A reply with an unexpected code, or a protocol violation."""


class Client:
    """One lock-step SMTP connection over asyncio streams."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.stage = "connect"

    async def _reply(self, want: int) -> None:
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPFailure(f"{self.stage}: connection closed by server")
            if len(line) < 4 or line[3:4] != b"-":
                break
        if not line[:3].isdigit():
            raise SMTPFailure(f"{self.stage}: malformed reply {line[:80]!r}")
        if line[0] - 0x30 != want:
            raise SMTPFailure(f"{self.stage}: {line.decode('ascii', 'replace').strip()[:120]}")

    async def _command(self, stage: str, data: bytes, want: int) -> None:
        assert self.writer is not None
        self.stage = stage
        self.writer.write(data)
        await self._reply(want)

    async def open(self) -> None:
        self.stage = "connect"
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.stage = "banner"
        await self._reply(2)
        await self._command("EHLO", b"EHLO " + EHLO_NAME.encode() + b"\r\n", 2)

    async def send(self, payload: bytes) -> None:
        await self._command("MAIL", b"MAIL FROM:<" + SENDER.encode() + b">\r\n", 2)
        await self._command("RCPT", b"RCPT TO:<" + RECIPIENT.encode() + b">\r\n", 2)
        await self._command("DATA", b"DATA\r\n", 3)
        await self._command("message", payload, 2)

    async def quit(self) -> None:
        await self._command("QUIT", b"QUIT\r\n", 2)
        await self.close()

    async def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)


@dataclass
class Tally:
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)


_ERRORS = (OSError, SMTPFailure, TimeoutError, ValueError, asyncio.IncompleteReadError)


async def fresh_session(port: int, payloads: list[bytes], tally: Tally) -> None:
    """A new connection for every message."""
    for payload in payloads:
        client = Client(port)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                await client.open()
                await client.send(payload)
                tally.ok += 1
                tally.latencies.append(time.perf_counter() - t0)
                await client.quit()
        except _ERRORS as exc:
            tally.failures[_describe(client.stage, exc)] += 1
        finally:
            await client.close()


async def reuse_session(port: int, payloads: list[bytes], tally: Tally) -> None:
    """One connection for all of this session's messages (reconnects after an error)."""
    client: Client | None = None
    try:
        for payload in payloads:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(REPLY_TIMEOUT):
                    if client is None:
                        client = Client(port)
                        await client.open()
                    await client.send(payload)
                tally.ok += 1
                tally.latencies.append(time.perf_counter() - t0)
            except _ERRORS as exc:
                if client is not None:
                    tally.failures[_describe(client.stage, exc)] += 1
                    await client.close()
                client = None
        if client is not None:
            with contextlib.suppress(*_ERRORS):
                async with asyncio.timeout(REPLY_TIMEOUT):
                    await client.quit()
    finally:
        if client is not None:
            await client.close()


def _describe(stage: str, exc: BaseException) -> str:
    if isinstance(exc, SMTPFailure):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"{stage}: no reply within {REPLY_TIMEOUT:.0f}s"
    return f"{stage}: {type(exc).__name__}: {exc}"


def _cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process and all its threads, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    target: str
    mode: str
    messages: int
    ok: int
    failed: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # percent of one core
    client_cpu: float
    failures: dict[str, int]


async def measure(target: str, mode: str, port: int, server_pid: int, messages: int, sessions: int,
                  size: int, tag: str, deadline: float) -> Run:
    payloads = [build_message(i, size, tag) for i in range(messages)]
    shares = [payloads[i::sessions] for i in range(sessions)]
    session: Callable[[int, list[bytes], Tally], Awaitable[None]] = (
        fresh_session if mode == "fresh" else reuse_session
    )
    tally = Tally()
    srv0, cli0 = _cpu_seconds(server_pid), time.process_time()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(session(port, share, tally) for share in shares if share))
    except TimeoutError:
        missing = messages - tally.ok - sum(tally.failures.values())
        tally.failures[f"measurement stopped after {deadline:.0f}s (--max-seconds)"] += max(missing, 0)
    elapsed = time.perf_counter() - t0
    srv1, cli1 = _cpu_seconds(server_pid), time.process_time()
    lat = sorted(tally.latencies)
    return Run(
        target=target, mode=mode, messages=messages, ok=tally.ok, failed=sum(tally.failures.values()),
        seconds=round(elapsed, 4), rate=tally.ok / elapsed if elapsed else 0.0,
        p50_ms=1000 * lat[len(lat) // 2] if lat else float("nan"),
        p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        server_cpu=100 * (srv1 - srv0) / elapsed, client_cpu=100 * (cli1 - cli0) / elapsed,
        failures=dict(tally.failures),
    )


# -- servers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5) as s:
            s.settimeout(2)
            if s.recv(100).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                with contextlib.suppress(OSError):
                    s.recv(100)
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not answer within {START_TIMEOUT:.0f}s")


def start_server(cmd: list[str], port: int, workdir: Path, name: str,
                 procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    log_path = workdir / f"{name}.log"
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's monomail, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                cwd=workdir, env=env, start_new_session=True)
    procs.append(proc)
    wait_ready(proc, port, log_path)
    return proc


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return -9
    return proc.returncode


def monomail_config(directory: Path, port: int, sessions: int) -> Path:
    path = directory / "monomail.toml"
    path.write_text(f"""\
hostname = "bench.example.test"

[server]
listen = ["{HOST}:{port}"]
spool_dir = "spool"
max_connections = {max(100, 2 * sessions + 10)}
trusted_networks = ["127.0.0.0/8"]
shutdown_grace = "10s"

[local]
domains = ["example.test"]
mailbox_format = "maildir"
mail_dir = "mail"

[users.alice]

[log]
level = "warning"
file = "monomail-log.txt"
""")
    return path


# -- the benchmark --------------------------------------------------------------------


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def _finite(obj: Any) -> Any:
    """``obj`` with NaN floats (no latency measured) as None, so the JSON is strict."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


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
            if not rs:
                continue
            failures: collections.Counter[str] = collections.Counter()
            for r in rs:
                failures.update(r.failures)
            out[(target, mode)] = {
                "target": target, "mode": mode,
                "median_rate": statistics.median(r.rate for r in rs),
                "min_rate": min(r.rate for r in rs), "max_rate": max(r.rate for r in rs),
                "p50_ms": statistics.median(r.p50_ms for r in rs),
                "p99_ms": statistics.median(r.p99_ms for r in rs),
                "server_cpu": statistics.median(r.server_cpu for r in rs),
                "client_cpu": statistics.median(r.client_cpu for r in rs),
                "failed": sum(failures.values()), "failures": dict(failures),
                "rounds": [r.rate for r in rs],
            }
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
    for s in summary.values():
        for text, n in list(s["failures"].items())[:MAX_SHOWN_FAILURES]:
            print(f"  failure {s['target']}/{s['mode']} x{n}: {text}", file=out)


async def amain(args: argparse.Namespace, workdir: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    runs: list[Run] = []
    check: dict[str, Any] | None = None
    server_exit: dict[str, int] = {}
    for target in args.targets:
        port = free_port()
        if target == "sink":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-sink", str(port)]
        else:
            cmd = [sys.executable, "-m", "monomail", "serve", "-c",
                   str(monomail_config(workdir, port, args.sessions))]
        progress(f"{target}: starting on {HOST}:{port}")
        proc = start_server(cmd, port, workdir, target, procs)
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
        print(json.dumps(_finite({
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=2000, help="messages per measurement (default 2000)")
    p.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (default 10)")
    p.add_argument("--size", type=int, default=2048, help="approximate message size in bytes (default 2048)")
    p.add_argument("--rounds", type=int, default=3, help="repeat each measurement, report the median (default 3)")
    p.add_argument("--warmup", type=int, default=50, help="untimed messages per mode before timing (default 50)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop one measurement after this long and count the rest as failed (default 60)")
    p.add_argument("--target", dest="targets", action="append", choices=TARGETS,
                   help="measure only this target (repeatable; default both)")
    p.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, Maildir)")
    p.add_argument("--serve-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("messages", "sessions", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.size < 512 or args.warmup < 0:
        p.error("--size must be at least 512 and --warmup not negative")
    args.targets = args.targets or list(TARGETS)
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_sink is not None:
        run_loop(serve_sink(args.serve_sink))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="monomail-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, _terminate)  # so that the finally below kills the servers
    try:
        return run_loop(amain(args, workdir, procs))
    except RuntimeError as exc:
        print(f"throughput: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
