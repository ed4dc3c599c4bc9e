"""Authentication benchmark: the per-message cost of DKIM signing and of inbound checks.

What it measures, in messages per second, one run of each on the same machine:

- ``sign-off`` / ``sign-rsa`` / ``sign-rsa+ed``: a trusted client (127.0.0.1) sends mail
  from ``client.example.net`` (one of monomail's domains here) to ``sink.test``; monomail
  relays each message (``remote.smarthost``, cut-through) to a counting aiosmtpd sink on
  127.0.0.2, signing it with no key, an RSA-2048 key, or an RSA and an Ed25519 key
  (``[dkim."client.example.net"]``, keys made by ``monomail dkim keygen``). The sink
  counts messages and ``DKIM-Signature:`` fields, so every run checks that each message
  carried the signatures it should.
- ``check-off`` / ``check-on``: an untrusted client (127.0.0.1, not in
  ``trusted_networks``) sends mail from ``client.example.net`` (not ours here) to a local
  Maildir user; with ``[checks]`` off, or with SPF, DKIM and DMARC (``enforce``) against
  ``tests/peers.DNSServer`` on 127.0.0.1, which serves the sender's SPF
  (``v=spf1 ip4:127.0.0.1 -all``), its DKIM key and ``p=reject`` DMARC. Each message is
  DKIM-signed (RSA-2048, dkimpy) before the clock starts. Every run checks that the Maildir
  got every message, and that a delivered message's ``Authentication-Results`` field has
  ``spf=pass``, ``dkim=pass`` and ``dmarc=pass`` (``check-on``) or no result (``check-off``).

The load generator is this process (``_common``: raw asyncio streams, lock-step SMTP,
connections reused, ``--sessions`` in parallel), after ``--warmup`` untimed messages.
CPU use of monomail is sampled per run.

Usage::

    python bench/auth.py [--messages 1000] [--sessions 10] [--size 2048] [--json]

Everything listens on 127.0.0.1 / 127.0.0.2 only; every subprocess is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    ERRORS,
    Client,
    RunStats,
    Tally,
    add_output_options,
    cpu_seconds,
    data_payload,
    finite,
    free_port,
    latency_ms,
    loop_name,
    message_lines,
    new_parser,
    progress,
    run_as,
    run_benchmark,
    run_sessions,
    serve_counting_sink,
    start_server,
    stop_server,
)
from relay import dns_server_class, log_problems

CLIENT_HOST = "127.0.0.1"
SINK_HOST = "127.0.0.2"
SENDER_DOMAIN = "client.example.net"  # _common.SENDER's domain
HOSTNAME = "mx.example.test"
REPLY_TIMEOUT = 60.0
SETTLE_TIMEOUT = 15.0  # after a run, how long the checks wait for late deliveries


# -- the sink (a subprocess: ``auth.py --serve-sink PORT``) ------------------------------


class SignatureSink:
    """Counts messages and the DKIM-Signature fields in their headers; stores nothing."""

    def __init__(self) -> None:
        self.messages = 0
        self.signatures = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content or envelope.content
        head = data.split(b"\r\n\r\n", 1)[0]
        self.messages += 1
        self.signatures += sum(1 for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
        return "250 OK"

    def counts(self) -> tuple[int, int]:
        return self.messages, self.signatures


async def serve_sink(port: int) -> None:
    await serve_counting_sink(SINK_HOST, port, SignatureSink())


async def sink_count(port: int) -> tuple[int, int]:
    client = Client(SINK_HOST, port)
    try:
        async with asyncio.timeout(10):
            await client.open(ehlo=False)
            words = (await client.command("XCOUNT", b"XCOUNT\r\n", 2)).split()
            with contextlib.suppress(*ERRORS):
                await client.command("QUIT", b"QUIT\r\n", 2)
    finally:
        await client.close()
    return int(words[1]), int(words[2])


# -- configs and keys -----------------------------------------------------------------


def monomail(*args: str, cwd: Path) -> str:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-m", "monomail", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"monomail {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def txt_value(keygen_output: str) -> str:
    """The TXT value in ``monomail dkim keygen``'s zone line."""
    line = next(x for x in keygen_output.splitlines() if " IN TXT " in x)
    return "".join(part for i, part in enumerate(line.partition(" IN TXT ")[2].split('"')) if i % 2)


def config_text(listen: str, *, trusted: str, domains: list[str], sections: str) -> str:
    return f"""\
hostname = "{HOSTNAME}"

[server]
listen = ["{listen}"]
spool_dir = "spool"
max_connections = 200
max_connections_per_ip = 200
trusted_networks = ["{trusted}"]
shutdown_grace = "10s"
user = "{run_as()}"

[local]
domains = {json.dumps(domains)}
mailbox_format = "maildir"
mail_dir = "mail"

[users.postmaster]

{sections}[log]
level = "warning"
file = "monomail-log.txt"
"""


@dataclass
class Run(RunStats):
    server_cpu: float  # % of one core
    check: str  # what the after-run check found
    check_ok: bool


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path


def start(name: str, workdir: Path, procs: list[subprocess.Popen[bytes]], **config: Any) -> Server:
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port(CLIENT_HOST)
    (directory / "monomail.toml").write_text(config_text(f"{CLIENT_HOST}:{port}", **config))
    proc = start_server([sys.executable, "-m", "monomail", "serve", "-c", "monomail.toml"], CLIENT_HOST, port,
                        directory, "monomail", procs)
    progress(f"{name}: monomail on {CLIENT_HOST}:{port}")
    return Server(name, proc, port, directory)


def maildir_count(server: Server) -> int:
    new = server.directory / "mail" / "postmaster" / "new"
    return len(os.listdir(new)) if new.is_dir() else 0


# -- runs -----------------------------------------------------------------------------


async def load(server: Server, jobs: list[tuple[list[str], bytes]], sessions: int) -> tuple[Tally, float, float]:
    tally = Tally()
    c0 = cpu_seconds(server.proc.pid)
    elapsed = await run_sessions(CLIENT_HOST, server.port, "reuse", jobs, sessions, 600, REPLY_TIMEOUT, tally)
    return tally, elapsed, cpu_seconds(server.proc.pid) - c0


def make_run(name: str, n: int, tally: Tally, elapsed: float, cpu: float, check: str, ok: bool) -> Run:
    p50, p99 = latency_ms(tally.latencies)
    failed = sum(tally.failures.values())
    return Run(name, "reuse", n, tally.ok, failed, round(elapsed, 3), tally.ok / elapsed if elapsed else 0.0, p50, p99,
               100 * cpu / elapsed if elapsed else 0.0, check, ok and failed == 0 and tally.ok == n)


def outbound_jobs(n: int, size: int, tag: str) -> list[tuple[list[str], bytes]]:
    return [([f"user{i % 1000}@sink.test"], data_payload(message_lines(i, size, tag, f"<user{i % 1000}@sink.test>",
                                                                       "Hello,")))
            for i in range(n)]


def signed_jobs(n: int, size: int, tag: str, key: bytes) -> list[tuple[list[str], bytes]]:
    import dkim  # dkimpy: the bench signs like a well-behaved sending domain would

    jobs = []
    for i in range(n):
        lines = message_lines(i, size, tag, "<postmaster@example.test>", "Hello,")
        raw = ("\r\n".join(lines) + "\r\n").encode()
        sig = dkim.sign(raw, b"mail", SENDER_DOMAIN.encode(), key, linesep=b"\r\n",
                        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        jobs.append((["postmaster@example.test"], data_payload((sig + raw).decode().split("\r\n")[:-1])))
    return jobs


async def amain(args: argparse.Namespace, workdir: Path, procs: list[subprocess.Popen[bytes]],
                closers: list[Any]) -> int:
    sink_port = free_port(SINK_HOST)
    start_server([sys.executable, str(Path(__file__).resolve()), "--serve-sink", str(sink_port)], SINK_HOST,
                 sink_port, workdir / "sink", "sink", procs)
    keys = workdir / "keys"
    keys.mkdir()
    (keys / "monomail.toml").write_text("")
    monomail("dkim", "keygen", SENDER_DOMAIN, "--selector", "mail", "-c", "monomail.toml", cwd=keys)
    monomail("dkim", "keygen", SENDER_DOMAIN, "--selector", "ed", "--algorithm", "ed25519", "-c", "monomail.toml",
             cwd=keys)
    rsa_key, ed_key = keys / "dkim" / f"{SENDER_DOMAIN}.mail.key", keys / "dkim" / f"{SENDER_DOMAIN}.ed.key"
    sender_key = keys / "sender.key"  # the untrusted sender's own key, for the inbound messages
    public = txt_value(monomail("dkim", "keygen", SENDER_DOMAIN, "--key", str(sender_key), "-c", "monomail.toml",
                                cwd=keys))
    dns = dns_server_class()().start()
    closers.append(dns.stop)
    dns.txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.1 -all")
    dns.txt(f"mail._domainkey.{SENDER_DOMAIN}", public)
    dns.txt(f"_dmarc.{SENDER_DOMAIN}", "v=DMARC1; p=reject")
    dns.a(HOSTNAME, CLIENT_HOST)
    n = args.messages
    runs: list[Run] = []
    exits: dict[str, int] = {}
    problems: dict[str, list[str]] = {}

    smarthost = f'[remote]\nsmarthost = "{SINK_HOST}:{sink_port}"\ntls = "none"\n\n'
    for name, dkim_lines, per_message in (
            ("sign-off", "", 0),
            ("sign-rsa", f'selector = "mail"\nkey = "{rsa_key}"\n', 1),
            ("sign-rsa+ed", f'selector = "mail"\nkey = "{rsa_key}"\ned25519_selector = "ed"\n'
                            f'ed25519_key = "{ed_key}"\n', 2)):
        dkim_section = f'[dkim."{SENDER_DOMAIN}"]\n{dkim_lines}\n' if dkim_lines else ""
        server = start(name, workdir, procs, trusted="127.0.0.0/8", domains=["example.test", SENDER_DOMAIN],
                       sections=smarthost + dkim_section)
        await load(server, outbound_jobs(args.warmup, args.size, "w" + name), args.sessions)
        m0, s0 = await sink_count(sink_port)
        tally, elapsed, cpu = await load(server, outbound_jobs(n, args.size, name), args.sessions)

        deadline = time.monotonic() + SETTLE_TIMEOUT  # cut-through: normally arrived already
        while (await sink_count(sink_port))[0] - m0 < tally.ok and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        m1, s1 = await sink_count(sink_port)
        sigs = s1 - s0
        runs.append(make_run(name, n, tally, elapsed, cpu,
                             f"sink got {m1 - m0} messages with {sigs} DKIM-Signature fields",
                             m1 - m0 == n and sigs == n * per_message))
        exits[name] = stop_server(server.proc)
        problems[name] = log_problems(server.directory)

    dns_section = f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = "5s"\n\n'
    key = sender_key.read_bytes()
    for name, checks in (("check-off", 'spf = false\ndkim = false\ndmarc = "off"\n'),
                         ("check-on", 'spf = true\ndkim = true\ndmarc = "enforce"\n')):
        server = start(name, workdir, procs, trusted="127.0.0.2/32", domains=["example.test"],
                       sections=dns_section + f"[checks]\n{checks}arc_seal = false\n\n")
        warm = signed_jobs(args.warmup, args.size, "w" + name, key)
        await load(server, warm, args.sessions)
        jobs = signed_jobs(n, args.size, name, key)
        before = maildir_count(server)
        tally, elapsed, cpu = await load(server, jobs, args.sessions)

        deadline = time.monotonic() + SETTLE_TIMEOUT
        while maildir_count(server) - before < tally.ok and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        got = maildir_count(server) - before
        new = server.directory / "mail" / "postmaster" / "new"
        sample = next(iter(sorted(new.iterdir())), None) if new.is_dir() else None
        head = sample.read_bytes().split(b"\n\n", 1)[0].decode("ascii", "replace") if sample else ""
        results = [x for x in head.replace("\n\t", " ").replace("\n ", " ").splitlines()
                   if x.lower().startswith("authentication-results:")]
        if name == "check-on":
            good = bool(results) and all(f"{m}=pass" in results[0] for m in ("spf", "dkim", "dmarc"))
            seen = results[0][:160] if results else "no Authentication-Results field"
        else:
            # no method was run: no field, or one that says "none" (RFC 8601 §2.2)
            good = not results or not any(f"{m}=" in results[0] for m in ("spf", "dkim", "dmarc"))
            seen = results[0][:160] if results else "no Authentication-Results field"
        runs.append(make_run(name, n, tally, elapsed, cpu, f"Maildir got {got}; sample: {seen}",
                             good and got == n))
        exits[name] = stop_server(server.proc)
        problems[name] = log_problems(server.directory)

    ok = all(r.check_ok for r in runs) and not any(exits.values()) and not any(problems.values())
    rate = {r.target: r.rate for r in runs}
    ratios = {f"{a}/{b}": rate[a] / rate[b] for a, b in (("sign-rsa", "sign-off"), ("sign-rsa+ed", "sign-off"),
                                                         ("check-on", "check-off")) if rate.get(b)}
    if args.json:
        print(json.dumps(finite({"settings": {"messages": n, "sessions": args.sessions, "size": args.size,
                                              "warmup": args.warmup, "loop": loop_name(), "cpus": os.cpu_count()},
                                 "runs": [asdict(r) for r in runs], "ratios": ratios, "ok": ok,
                                 "server_exit": exits, "log_problems": problems}), indent=2))
        return 0 if ok else 1
    print(f"\n{n} messages of ~{args.size} bytes, {args.sessions} sessions (connections reused), one run each, "
          f"loop {loop_name()}, {os.cpu_count()} CPUs")
    print(f"{'target':12} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'server CPU':>10}  check")
    for r in runs:
        print(f"{r.target:12} {r.rate:8.1f} {r.p50_ms:8.1f} {r.p99_ms:8.1f} {r.server_cpu:9.0f}%  "
              f"{'OK' if r.check_ok else 'MISMATCH'}: {r.check}")
    for key_, value in ratios.items():
        print(f"ratio {key_}: {value:.2f}")
    for name, code in exits.items():
        lines = problems[name]
        print(f"monomail {name}: exit {code}, " + (f"{len(lines)} warning/error line(s)" if lines else "clean log"))
        for line in lines[:5]:
            print(f"    {line[:200]}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    p.set_defaults(messages=1000)
    p.add_argument("--warmup", type=int, default=50, help="untimed messages per target (default 50)")
    add_output_options(p, "keep the temporary directory (configs, keys, logs)")
    args = p.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.size < 512 or args.warmup < 0:
        p.error("--messages and --sessions at least 1, --size at least 512, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("auth", "monomail-auth-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs, closers), serve_sink)


if __name__ == "__main__":
    sys.exit(main())
