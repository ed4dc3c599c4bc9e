"""What the bench/ scripts (throughput, relay, latency, killstorm) share: event loop, sink
plumbing, messages, the raw-asyncio SMTP load generator, subprocess servers, CPU sampling,
percentiles, client loop lag, summaries, CLI and main.

Not a benchmark itself; the scripts import it as ``_common`` (Python puts a script's own
folder first on ``sys.path``, so this works from any working directory).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, TextIO

SENDER = "bench-sender@client.example.net"
EHLO_NAME = "client.example.net"
START_TIMEOUT = 20.0  # seconds a server may take to answer its first banner

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


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the sink server (runs in a subprocess: ``<script> --serve-sink PORT``) -------------


async def serve_sink_until_signalled(host: str, port: int, hostname: str, handler: Any,
                                     smtp_class: Any = None) -> None:
    """Serve ``handler`` with a bare aiosmtpd ``SMTP`` (or ``smtp_class``) until SIGTERM/SIGINT."""
    from aiosmtpd.smtp import SMTP

    smtp = smtp_class or SMTP
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # as monomail does
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: smtp(handler, enable_SMTPUTF8=True, decode_data=False, hostname=hostname,
                     ident="ESMTP sink", loop=loop),
        host=host, port=port, reuse_address=True, backlog=512,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


async def serve_counting_sink(host: str, port: int, handler: Any) -> None:
    """`serve_sink_until_signalled` for a handler that counts what it drops: the
    benchmark extension ``XCOUNT`` answers ``250 <first> <second>`` of ``handler.counts()``."""
    from aiosmtpd.smtp import SMTP

    class CountingSMTP(SMTP):
        async def smtp_XCOUNT(self, arg: str | None) -> None:
            first, second = handler.counts()
            await self.push(f"250 {first} {second}")

    await serve_sink_until_signalled(host, port, "mx.sink.test", handler, CountingSMTP)


# -- messages -------------------------------------------------------------------------


def message_lines(index: int, size: int, tag: str, to: str, greeting: str) -> list[str]:
    """One plain-text message of about ``size`` bytes (CRLF counted), as lines."""
    rng = random.Random(index)
    lines = [
        f"Received: from workstation.example.net (workstation.example.net [192.0.2.{index % 250 + 1}])",
        f"\tby {EHLO_NAME} with ESMTPSA id {tag}{index:06d}; {formatdate(localtime=True)}",
        f"Date: {formatdate(localtime=True)}",
        "From: Bench Sender <bench-sender@client.example.net>",
        f"To: {to}",
        f"Subject: Quarterly figures, part {index} ({tag})",
        f"Message-ID: <{tag}.{index}.{rng.getrandbits(48):012x}@client.example.net>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii; format=flowed",
        "Content-Transfer-Encoding: 7bit",
        "User-Agent: monomail-bench/1.0",
        "",
        greeting,
        "",
    ]
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
    return lines + ["", ". (this line starts with a dot)", "", "-- ", "Bench Sender, Example Net"]


def data_payload(lines: Iterable[str]) -> bytes:
    """The DATA payload of ``lines``: dot-stuffed, CRLF, ending in '.'."""
    stuffed = ("." + x if x.startswith(".") else x for x in lines)
    return ("\r\n".join(stuffed) + "\r\n.\r\n").encode("ascii")


# -- the load generator ---------------------------------------------------------------


class SMTPFailure(Exception):
    """A reply with an unexpected code, or a protocol violation."""


class Client:
    """One lock-step SMTP connection over asyncio streams."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.stage = "connect"

    async def _last_line(self) -> bytes:
        """The last line of the next reply (raw), its code checked to be three digits."""
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPFailure(f"{self.stage}: connection closed by server")
            if len(line) < 4 or line[3:4] != b"-":
                break
        if not line[:3].isdigit():
            raise SMTPFailure(f"{self.stage}: malformed reply {line[:80]!r}")
        return line

    async def exchange(self, stage: str, data: bytes) -> tuple[int, str]:
        """Send ``data``; the reply's code and last line (text), whatever the code."""
        assert self.writer is not None
        self.stage = stage
        self.writer.write(data)
        line = await self._last_line()
        return int(line[:3]), line.decode("ascii", "replace").strip()

    async def _reply(self, want: int) -> bytes:
        """The last line of the reply (raw), if its code starts with ``want``."""
        line = await self._last_line()
        if line[0] - 0x30 != want:
            raise SMTPFailure(f"{self.stage}: {line.decode('ascii', 'replace').strip()[:120]}")
        return line

    async def command(self, stage: str, data: bytes, want: int) -> bytes:
        assert self.writer is not None
        self.stage = stage
        self.writer.write(data)
        return await self._reply(want)

    async def stream(self, stage: str, data: bytes, want: int, chunk: int = 65536) -> bytes:
        """Like :meth:`command`, but written ``chunk`` bytes at a time, waiting for the socket to
        drain after each (a big DATA payload streamed, not handed to the transport at once)."""
        assert self.writer is not None
        self.stage = stage
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            self.writer.write(view[start:start + chunk])
            await self.writer.drain()
        return await self._reply(want)

    async def open(self, ehlo: bool = True) -> None:
        self.stage = "connect"
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.stage = "banner"
        await self._reply(2)
        if ehlo:
            await self.command("EHLO", b"EHLO " + EHLO_NAME.encode() + b"\r\n", 2)

    async def send(self, rcpts: list[str], payload: bytes) -> None:
        await self.command("MAIL", b"MAIL FROM:<" + SENDER.encode() + b">\r\n", 2)
        for rcpt in rcpts:
            await self.command("RCPT", b"RCPT TO:<" + rcpt.encode() + b">\r\n", 2)
        await self.command("DATA", b"DATA\r\n", 3)
        await self.command("message", payload, 2)

    async def quit(self) -> None:
        await self.command("QUIT", b"QUIT\r\n", 2)
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


@dataclass
class RunStats:
    """The fields every benchmark's ``Run`` starts with (subclasses add CPU figures, ``failures`` ...)."""

    target: str
    mode: str
    messages: int
    ok: int
    failed: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float


ERRORS = (OSError, SMTPFailure, TimeoutError, ValueError, asyncio.IncompleteReadError)
Job = tuple[list[str], bytes]  # recipients, payload


def describe(stage: str, exc: BaseException, reply_timeout: float) -> str:
    if isinstance(exc, SMTPFailure):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"{stage}: no reply within {reply_timeout:.0f}s"
    return f"{stage}: {type(exc).__name__}: {exc}"


async def fresh_session(host: str, port: int, jobs: list[Job], tally: Tally, reply_timeout: float) -> None:
    """A new connection for every message."""
    for rcpts, payload in jobs:
        client = Client(host, port)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(reply_timeout):
                await client.open()
                await client.send(rcpts, payload)
                tally.ok += 1
                tally.latencies.append(time.perf_counter() - t0)
                await client.quit()
        except ERRORS as exc:
            tally.failures[describe(client.stage, exc, reply_timeout)] += 1
        finally:
            await client.close()


async def reuse_session(host: str, port: int, jobs: list[Job], tally: Tally, reply_timeout: float) -> None:
    """One connection for all of this session's messages (reconnects after an error)."""
    client: Client | None = None
    try:
        for rcpts, payload in jobs:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(reply_timeout):
                    if client is None:
                        client = Client(host, port)
                        await client.open()
                    await client.send(rcpts, payload)
                tally.ok += 1
                tally.latencies.append(time.perf_counter() - t0)
            except ERRORS as exc:
                tally.failures[describe(client.stage if client else "connect", exc, reply_timeout)] += 1
                if client is not None:
                    await client.close()
                client = None
        if client is not None:
            with contextlib.suppress(*ERRORS):
                async with asyncio.timeout(reply_timeout):
                    await client.quit()
    finally:
        if client is not None:
            await client.close()


async def run_sessions(host: str, port: int, mode: str, jobs: list[Job], sessions: int, deadline: float,
                       reply_timeout: float, tally: Tally) -> float:
    """Spread ``jobs`` over ``sessions`` parallel sessions in ``mode`` ("fresh" or "reuse"), all
    stopped after ``deadline`` seconds (the rest counted as failed). Returns the seconds taken."""
    shares = [jobs[i::sessions] for i in range(sessions)]
    session = fresh_session if mode == "fresh" else reuse_session
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(session(host, port, share, tally, reply_timeout) for share in shares if share))
    except TimeoutError:
        missing = len(jobs) - tally.ok - sum(tally.failures.values())
        tally.failures[f"measurement stopped after {deadline:.0f}s (--max-seconds)"] += max(missing, 0)
    return time.perf_counter() - t0


def latency_ms(latencies: list[float]) -> tuple[float, float]:
    """Median and 99th percentile in milliseconds (NaN without any)."""
    lat = sorted(latencies)
    p50 = 1000 * lat[len(lat) // 2] if lat else float("nan")
    p99 = 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    return p50, p99


def percentiles_ms(latencies: list[float], points: Iterable[float] = (50, 90, 99, 100)) -> dict[str, float]:
    """``{"p50": ms, "p90": ms, ..., "max": ms}`` (nearest rank; NaN without any); 100 is "max"."""
    lat = sorted(latencies)
    out = {}
    for p in points:
        name = "max" if p == 100 else f"p{p:g}"
        if not lat:
            out[name] = float("nan")
            continue
        rank = max(1, -(-len(lat) * p // 100))  # ceil(n * p / 100), at least 1
        out[name] = 1000 * lat[min(len(lat), int(rank)) - 1]
    return out


class LoopLag:
    """How late this process's own event loop wakes up: a task sleeps ``interval`` seconds over and
    over and records the overshoot. A big value means the load generator, not the server, was slow."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.lags.append(max(0.0, time.perf_counter() - t0 - self.interval))

    def start(self) -> None:
        self.lags = []
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> dict[str, float]:
        """Stop; the lag's p99 and max in ms."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        got = percentiles_ms(self.lags, (99, 100))
        return {"p99_ms": got["p99"], "max_ms": got["max"]}


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU time of a process and all its threads, from /proc."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- servers ------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen[bytes], host: str, port: int, log_path: Path, *,
               label: str | None = None, where: str | None = None) -> None:
    """Wait for the server's 220 banner. The errors call it ``label`` (default: its command line)
    and ``server on {where}`` (default: host:port)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{label or ' '.join(map(str, proc.args))} exited with {proc.returncode}: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5) as s:
            s.settimeout(2)
            if s.recv(100).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                with contextlib.suppress(OSError):
                    s.recv(100)
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on {where or f'{host}:{port}'} did not answer within {START_TIMEOUT:.0f}s")


def start_server(cmd: list[str], host: str, port: int, workdir: Path, name: str,
                 procs: list[subprocess.Popen[bytes]], stdout: Path | None = None,
                 **errors: str) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in ``workdir``; output to ``<name>.log`` (or stdout to ``stdout``). ``errors``:
    ``label`` and ``where`` for :func:`wait_ready`."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's monomail, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with log_path.open("ab") as logf, (stdout or log_path).open("ab") as outf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=outf, stderr=logf,
                                cwd=workdir, env=env, start_new_session=True)
    procs.append(proc)
    wait_ready(proc, host, port, log_path, **errors)
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


def run_as() -> str:
    """``server.user`` for a benchmark's server: whoever runs the benchmark (root says so)."""
    return pwd.getpwuid(os.geteuid()).pw_name


def write_monomail_config(directory: Path, *, hostname: str, listen: str, max_connections: int, user: str,
                          server_extra: str = "", sections: str = "", local_extra: str = "") -> Path:
    """``directory/monomail.toml``: one trusted listener, a local Maildir domain ``example.test`` with
    ``user``, warnings logged to ``monomail-log.txt``. ``server_extra`` / ``local_extra``: more
    ``[server]`` / ``[local]`` lines; ``sections``: more tables (all as TOML text ending in a newline)."""
    path = directory / "monomail.toml"
    path.write_text(f"""\
hostname = "{hostname}"

[server]
listen = ["{listen}"]
spool_dir = "spool"
max_connections = {max_connections}
{server_extra}trusted_networks = ["127.0.0.0/8"]
shutdown_grace = "10s"
user = "{run_as()}"

[local]
domains = ["example.test"]
mailbox_format = "maildir"
mail_dir = "mail"
{local_extra}
[users.{user}]

{sections}[log]
level = "warning"
file = "monomail-log.txt"
""")
    return path


# -- results --------------------------------------------------------------------------


def finite(obj: Any) -> Any:
    """``obj`` with NaN floats (nothing measured) as None, so the JSON is strict."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def summary_row(target: str, mode: str, runs: list[Any], cpu_fields: tuple[str, ...],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Medians over the rounds ``runs`` (of one target and mode); ``extra`` goes before ``rounds``."""
    failures: collections.Counter[str] = collections.Counter()
    for r in runs:
        failures.update(r.failures)
    return {
        "target": target, "mode": mode,
        "median_rate": statistics.median(r.rate for r in runs),
        "min_rate": min(r.rate for r in runs), "max_rate": max(r.rate for r in runs),
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        **{name: statistics.median(getattr(r, name) for r in runs) for name in cpu_fields},
        "failed": sum(failures.values()), "failures": dict(failures),
        **(extra or {}),
        "rounds": [r.rate for r in runs],
    }


def print_failures(summary: Iterable[dict[str, Any]], out: TextIO, most: int) -> None:
    for s in summary:
        for text, n in list(s["failures"].items())[:most]:
            print(f"  failure {s['target']}/{s['mode']} x{n}: {text}", file=out)


# -- command line and main ------------------------------------------------------------


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with the load options."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    add_load_options(p)
    return p


def add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", type=int, default=2000, help="messages per measurement (default 2000)")
    p.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (default 10)")
    p.add_argument("--size", type=int, default=2048, help="approximate message size in bytes (default 2048)")


def add_round_options(p: argparse.ArgumentParser, warmup_help: str) -> None:
    p.add_argument("--rounds", type=int, default=3, help="repeat each measurement, report the median (default 3)")
    p.add_argument("--warmup", type=int, default=50, help=warmup_help)
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop one measurement after this long and count the rest as failed (default 60)")


def add_output_options(p: argparse.ArgumentParser, keep_help: str) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    p.add_argument("--keep", action="store_true", help=keep_help)
    p.add_argument("--serve-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


Amain = Callable[[Path, list[subprocess.Popen[bytes]], list[Callable[[], None]]], Coroutine[Any, Any, int]]


def run_benchmark(name: str, prefix: str, args: argparse.Namespace, amain: Amain,
                  serve_sink: Callable[[int], Coroutine[Any, Any, None]] | None = None) -> int:
    """With ``--serve-sink PORT`` (benchmarks that have a ``serve_sink``), be that sink.
    Else run ``amain(workdir, procs, closers)`` in a new temporary directory; afterwards
    kill what is left in ``procs``, call ``closers`` and remove the directory (unless
    ``--keep``)."""
    if serve_sink is not None and getattr(args, "serve_sink", None) is not None:
        run_loop(serve_sink(args.serve_sink))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    procs: list[subprocess.Popen[bytes]] = []
    closers: list[Callable[[], None]] = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)  # so that the finally below kills the servers
    try:
        return run_loop(amain(workdir, procs, closers))
    except RuntimeError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
