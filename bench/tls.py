"""The cost of inbound TLS: messages per second with and without STARTTLS (issue 9, acceptance 7).

What it measures: one ``monomail serve`` subprocess without ``[tls]`` and then one with ``[tls]``
(a 2048-bit RSA self-signed certificate made by ``openssl`` here), the same config otherwise,
each delivering durably into one local Maildir user. ``--clients`` (N) threads each send
``--messages`` (M) messages with the stdlib ``smtplib``, in two modes:

- ``fresh``: a new connection per message (connect, banner, EHLO, [STARTTLS, EHLO], MAIL, RCPT,
  DATA, QUIT); with TLS every message pays a full handshake (smtplib keeps no TLS session, so
  there is no resumption: the worst case, as for a client that does not cache sessions);
- ``reuse``: ``--per-connection`` (K) messages per connection, MAIL/RCPT/DATA repeated.

So four rows: plain/fresh, plain/reuse, starttls/fresh, starttls/reuse, each ONE run (no rounds:
the figures are indicative; run it twice to see the noise), and the ratio starttls/plain per mode.
The client verifies no certificate (self-signed) and lets OpenSSL pick the protocol (TLS 1.3
here). Latency is per message, from connect (fresh) or MAIL (reuse) to the 250 after DATA.
After each server's runs the Maildir must hold exactly the messages accepted and the spool be
empty. ``srv CPU`` / ``cli CPU``: CPU use of monomail and of this process in % of one core.

Usage::

    python bench/tls.py [--clients 10] [--messages 100] [--per-connection 10] [--size 2048] [--json]

Everything listens on 127.0.0.1 only, is bounded in count and time (``--max-seconds`` per run),
and the servers are killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    EHLO_NAME,
    SENDER,
    RunStats,
    cpu_seconds,
    data_payload,
    finite,
    free_port,
    latency_ms,
    message_lines,
    progress,
    run_benchmark,
    start_server,
    stop_server,
    write_monomail_config,
)

HOST = "127.0.0.1"
RECIPIENT = "alice@example.test"
MODES = ("fresh", "reuse")
TARGETS = ("plain", "starttls")
TIMEOUT = 30.0  # seconds for one SMTP command


@dataclass
class Run(RunStats):
    server_cpu: float
    client_cpu: float
    tls: str
    failures: dict[str, int]


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=bench.example.test"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(index: int, size: int, tag: str) -> bytes:
    """The message as smtplib's ``sendmail`` wants bytes: CRLF lines, not dot-stuffed, no final dot."""
    payload = data_payload(message_lines(index, size, tag, "Alice Example <alice@example.test>", "Hello Alice,"))
    lines = payload[:-len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b"..") else line for line in lines)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.latencies: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.versions: collections.Counter[str] = collections.Counter()

    def success(self, seconds: float) -> None:
        with self.lock:
            self.ok += 1
            self.latencies.append(seconds)

    def failure(self, stage: str, exc: BaseException) -> None:
        with self.lock:
            self.failures[f"{stage}: {type(exc).__name__}: {str(exc)[:100]}"] += 1


def connect(port: int, tls: bool, ctx: ssl.SSLContext, tally: Tally) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, port, timeout=TIMEOUT)
    try:
        client.ehlo(EHLO_NAME)
        if tls:
            client.starttls(context=ctx)
            client.ehlo(EHLO_NAME)
            with tally.lock:
                tally.versions[str(client.sock.version())] += 1  # type: ignore[union-attr]
    except BaseException:
        client.close()
        raise
    return client


def client_thread(port: int, tls: bool, mode: str, jobs: list[bytes], per_connection: int, deadline: float,
                  tally: Tally) -> None:
    ctx = client_context()
    batch = 1 if mode == "fresh" else per_connection
    for start in range(0, len(jobs), batch):
        if time.monotonic() > deadline:
            for _ in jobs[start:]:
                tally.failure("deadline", TimeoutError("--max-seconds reached"))
            return
        client: smtplib.SMTP | None = None
        stage = "connect"
        try:
            t0 = time.perf_counter()
            client = connect(port, tls, ctx, tally)
            for i, body in enumerate(jobs[start:start + batch]):
                if i:
                    t0 = time.perf_counter()
                stage = "send"
                refused = client.sendmail(SENDER, [RECIPIENT], body)
                if refused:
                    raise smtplib.SMTPRecipientsRefused(refused)
                tally.success(time.perf_counter() - t0)
            stage = "quit"
            client.quit()
            client = None
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            tally.failure(stage, exc)
        finally:
            if client is not None:
                client.close()


def measure(target: str, mode: str, port: int, pid: int, args: argparse.Namespace, tag: str, count: int) -> Run:
    jobs = [message(i, args.size, tag) for i in range(count)]
    shares = [jobs[i::args.clients] for i in range(args.clients)]
    tally = Tally()
    deadline = time.monotonic() + args.max_seconds
    srv0, cli0 = cpu_seconds(pid), time.process_time()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for f in [pool.submit(client_thread, port, target == "starttls", mode, share, args.per_connection, deadline,
                              tally) for share in shares if share]:
            f.result()
    elapsed = time.perf_counter() - t0
    srv1, cli1 = cpu_seconds(pid), time.process_time()
    p50, p99 = latency_ms(tally.latencies)
    return Run(target=target, mode=mode, messages=count, ok=tally.ok, failed=sum(tally.failures.values()),
               seconds=round(elapsed, 3), rate=tally.ok / elapsed if elapsed else 0.0, p50_ms=p50, p99_ms=p99,
               server_cpu=100 * (srv1 - srv0) / elapsed, client_cpu=100 * (cli1 - cli0) / elapsed,
               tls=",".join(f"{v} x{n}" for v, n in tally.versions.items()) or "-",
               failures=dict(tally.failures))


def config(directory: Path, port: int, args: argparse.Namespace, cert: tuple[Path, Path] | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sections = f'[tls]\ncert = "{cert[0]}"\nkey = "{cert[1]}"\n\n' if cert else ""
    return write_monomail_config(directory, hostname="bench.example.test", listen=f"{HOST}:{port}",
                                 max_connections=max(100, 4 * args.clients + 10), user="alice",
                                 server_extra=f"max_connections_per_ip = {max(10, 4 * args.clients + 10)}\n",
                                 sections=sections)


def check_maildir(directory: Path, accepted: int) -> dict[str, Any]:
    def count(d: Path, suffix: str = "") -> int:
        try:
            return sum(1 for n in os.listdir(d) if n.endswith(suffix) and not n.startswith("."))
        except FileNotFoundError:
            return 0

    new, tmp = count(directory / "mail" / "alice" / "new"), count(directory / "mail" / "alice" / "tmp")
    spooled = count(directory / "spool", ".json")
    return {"accepted": accepted, "maildir_new": new, "maildir_tmp": tmp, "spool_entries": spooled,
            "ok": new == accepted and tmp == 0 and spooled == 0}


async def amain(args: argparse.Namespace, workdir: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    cert = make_cert(workdir)
    runs: list[Run] = []
    checks: dict[str, dict[str, Any]] = {}
    exits: dict[str, int] = {}
    for target in TARGETS:
        directory = workdir / target
        port = free_port(HOST)
        cmd = [sys.executable, "-m", "monomail", "serve", "-c",
               str(config(directory, port, args, cert if target == "starttls" else None))]
        progress(f"{target}: starting monomail on {HOST}:{port}")
        proc = start_server(cmd, HOST, port, directory, "server", procs, label=f"monomail ({target})")
        accepted = 0
        try:
            for mode in MODES:
                warm = await asyncio.to_thread(measure, target, mode, port, proc.pid, args, "warm", args.warmup)
                accepted += warm.ok
                run = await asyncio.to_thread(measure, target, mode, port, proc.pid, args, f"{target[0]}{mode[0]}",
                                              args.clients * args.messages)
                accepted += run.ok
                runs.append(run)
                progress(f"  {target:8} {mode:5}: {run.rate:7.1f} msg/s ({run.ok}/{run.messages} ok in "
                         f"{run.seconds:.2f}s, server CPU {run.server_cpu:.0f}%, client CPU {run.client_cpu:.0f}%)")
                if proc.poll() is not None:
                    raise RuntimeError(f"monomail ({target}) died (exit {proc.returncode})")
        finally:
            exits[target] = stop_server(proc)
        checks[target] = check_maildir(directory, accepted)

    by = {(r.target, r.mode): r for r in runs}
    ratios = {m: by[("starttls", m)].rate / by[("plain", m)].rate
              for m in MODES if by[("plain", m)].rate and ("starttls", m) in by}
    ok = all(r.failed == 0 for r in runs) and all(c["ok"] for c in checks.values()) \
        and all(code == 0 for code in exits.values())
    if args.json:
        print(json.dumps(finite({
            "settings": {"clients": args.clients, "messages_per_client": args.messages,
                         "per_connection": args.per_connection, "size": args.size, "warmup": args.warmup,
                         "cpus": os.cpu_count()},
            "runs": [asdict(r) for r in runs], "ratios": ratios, "maildir_check": checks,
            "server_exit": exits, "ok": ok,
        }), indent=2))
        return 0 if ok else 1
    size = len(message(0, args.size, "ff"))
    print(f"\n{args.clients} clients x {args.messages} messages of {size} bytes, {args.per_connection} per "
          f"connection in reuse mode, one run each, smtplib, {os.cpu_count()} CPUs")
    head = f"{'server':9} {'mode':6} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv CPU':>7} {'cli CPU':>7} " \
           f"{'failed':>6}  tls"
    print(head)
    print("-" * len(head))
    for r in runs:
        print(f"{r.target:9} {r.mode:6} {r.rate:8.1f} {r.p50_ms:7.2f} {r.p99_ms:7.2f} {r.server_cpu:6.0f}% "
              f"{r.client_cpu:6.0f}% {r.failed:6d}  {r.tls}")
    for mode, ratio in ratios.items():
        print(f"ratio starttls/plain, {mode:5}: {ratio:.2f}")
    for r in runs:
        for text, n in list(r.failures.items())[:5]:
            print(f"  failure {r.target}/{r.mode} x{n}: {text}")
    for target, c in checks.items():
        print(f"maildir check ({target}): {c['maildir_new']} in new/ for {c['accepted']} accepted, "
              f"{c['maildir_tmp']} in tmp/, {c['spool_entries']} spool entries: {'OK' if c['ok'] else 'MISMATCH'}")
    for target, code in exits.items():
        if code != 0:
            print(f"monomail ({target}) exited with {code}; see its log")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10, help="concurrent client threads (default 10)")
    p.add_argument("--messages", type=int, default=100, help="messages per client and mode (default 100)")
    p.add_argument("--per-connection", type=int, default=10, help="messages per connection in reuse mode (10)")
    p.add_argument("--size", type=int, default=2048, help="approximate message size in bytes (default 2048)")
    p.add_argument("--warmup", type=int, default=20, help="untimed messages per mode before timing (default 20)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop one run after this long (default 120)")
    p.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs, Maildirs)")
    args = p.parse_args(argv)
    for name in ("clients", "messages", "per_connection"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.size < 512 or args.warmup < 0:
        p.error("--size must be at least 512 and --warmup not negative")
    return args



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("tls", "monomail-bench-tls-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs))


if __name__ == "__main__":
    sys.exit(main())
