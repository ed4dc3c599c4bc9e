"""Idle connections (issue 13, acceptance 4): memory per idle connection, and a normal client's
latency while thousands of connections are held open.

One `monomail serve` (subprocess, temp dir, one Maildir user ``bob``, ``server.max_connections``
above the load, ``server.timeout`` and ``command_timeout`` 30 minutes so nothing is timed out,
127.0.0.0/8 trusted so the per-client limit does not apply). This process raises its own
``RLIMIT_NOFILE`` (the server inherits it) to ``--connections`` + 1000, the hard limit too when it
is lower and this process may (root). First one whole message is sent (the warm-up: code paths a
session needs the first time are loaded, and the one-time cost is not charged to the idle
connections). Then the server's RSS (``VmRSS`` of ``/proc/PID/status``) is read after a short
settle, ``--connections`` (10,000) connections are opened in batches of ``--batch`` (500), each
one's ``220`` banner read (so the server has made its session and written to it) and then held
idle, and the RSS is read again after a settle; per connection = the difference / the number
held. Then, with all of them still open, a normal client sends ``--probes`` (20) whole messages one
after another, each on a new connection (connect, banner, EHLO, MAIL, RCPT, DATA, QUIT), timed
from connect to the reply of QUIT (10 s bound per reply). Afterwards every idle connection must
still be open (none closed by the server), the Maildir must hold the warm-up and every probe, and
the server must stop cleanly on SIGTERM.

    python bench/idle.py                            # 10,000 connections, about 30 s
    python bench/idle.py --connections 2000 --json
    python bench/idle.py --max-kb 4 --max-ms 100    # acceptance 4 as the exit status

Only 127.0.0.1 is used. Exit status 1 if a connection or probe failed, an idle connection was
closed, the Maildir count does not match, the server did not stop cleanly, or (with
``--max-kb``/``--max-ms``) a figure is above its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c

HOST = "127.0.0.1"
FD_MARGIN = 1000  # descriptors besides the connections: the server's spool, logs, threads; our own
REPLY_TIMEOUT = 10.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:160] if str(exc) else type(exc).__name__


async def hold(port: int, count: int, batch: int, failures: Counter[str]
               ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open ``count`` connections, ``batch`` at a time, each past its 220 banner; the failures counted."""
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 30)
        except (OSError, TimeoutError) as exc:
            failures[f"connect: {reason(exc)}"] += 1
            return
        try:
            banner = await asyncio.wait_for(reader.readline(), 30)
        except (OSError, TimeoutError) as exc:
            failures[f"banner: {reason(exc)}"] += 1
            writer.close()
            return
        if not banner.startswith(b"220"):
            failures[f"banner: {banner[:80]!r}"] += 1
            writer.close()
            return
        held.append((reader, writer))

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return held


async def probe(port: int, index: int) -> float:
    """One whole message on a new connection; seconds from connect to the reply of QUIT."""
    started = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), REPLY_TIMEOUT)
    try:
        async def reply() -> bytes:
            while True:
                line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
                if not line:
                    raise ConnectionError("connection closed by the server")
                if line[3:4] != b"-":
                    return line

        async def say(line: bytes, want: bytes) -> None:
            writer.write(line)
            got = await reply()
            if not got.startswith(want):
                raise RuntimeError(f"{line[:40]!r} -> {got[:120]!r}")

        if not (await reply()).startswith(b"220"):
            raise RuntimeError("no 220 banner")
        await say(b"EHLO probe.example.net\r\n", b"250")
        await say(b"MAIL FROM:<probe@example.net>\r\n", b"250")
        await say(b"RCPT TO:<bob@example.test>\r\n", b"250")
        await say(b"DATA\r\n", b"354")
        await say(c.data_payload(c.message_lines(index, 2048, "idle", "bob@example.test", "probe")), b"250")
        await say(b"QUIT\r\n", b"221")
        return time.perf_counter() - started
    finally:
        writer.close()


def delivered(maildir: Path) -> int:
    return len(list(maildir.iterdir())) if maildir.is_dir() else 0


async def amain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = c.free_port(HOST)
    c.write_monomail_config(work, hostname="idle.bench.test", listen=f"{HOST}:{port}",
                            max_connections=args.connections + 100, user="bob",
                            server_extra='timeout = "30m"\ncommand_timeout = "30m"\n')
    procs: list[subprocess.Popen[bytes]] = []
    failures: Counter[str] = Counter()
    latencies: list[float] = []
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    maildir = work / "mail" / "bob" / "new"
    server = c.start_server([sys.executable, "-m", "monomail", "serve", "-c", str(work / "monomail.toml")],
                            HOST, port, work, "monomail", procs)
    try:
        try:
            await probe(port, 0)  # the warm-up message
        except (OSError, TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"the warm-up message failed: {reason(exc)}") from exc
        await asyncio.sleep(1.0)
        before = rss_kb(server.pid)
        started = time.perf_counter()
        held = await hold(port, args.connections, args.batch, failures)
        opened = time.perf_counter() - started
        await asyncio.sleep(2.0)
        after = rss_kb(server.pid)
        for i in range(1, args.probes + 1):
            try:
                latencies.append(await probe(port, i))
            except (OSError, TimeoutError, RuntimeError) as exc:
                failures[f"probe: {reason(exc)}"] += 1
        still = rss_kb(server.pid)
        await asyncio.sleep(0.1)
        closed = sum(1 for reader, _ in held if reader.at_eof())  # the server closed it meanwhile
        for _, writer in held:
            writer.close()
        want = 1 + len(latencies)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and delivered(maildir) < want:
            await asyncio.sleep(0.05)
        got = delivered(maildir)
    finally:
        exits = [c.stop_server(proc) for proc in procs]
    per = (after - before) / len(held) if held else float("nan")
    return {
        "connections": len(held), "asked": args.connections, "open_seconds": round(opened, 2),
        "rss_before_kb": before, "rss_after_kb": after, "rss_after_probes_kb": still,
        "kb_per_connection": round(per, 2), "closed_by_server": closed,
        "probe_ms": {"median": round(statistics.median(latencies) * 1000, 1) if latencies else float("nan"),
                     "max": round(max(latencies) * 1000, 1) if latencies else float("nan")},
        "probes": len(latencies), "delivered": got, "expected": want, "failures": dict(failures),
        "server_exit": exits[0], "loop": c.loop_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def raise_nofile(need: int) -> str | None:
    """Soft (and if needed hard) ``RLIMIT_NOFILE`` to at least ``need``; why not, or None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
        except (ValueError, OSError) as exc:
            return (f"RLIMIT_NOFILE hard limit {hard} is below {need} and cannot be raised here ({exc}): "
                    "raise it (ulimit -Hn, as root) or ask for fewer --connections")
        return None
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10000, help="idle connections to hold (default 10000)")
    p.add_argument("--batch", type=int, default=500, help="connections opened at once (default 500)")
    p.add_argument("--probes", type=int, default=20, help="messages sent meanwhile (default 20)")
    p.add_argument("--max-kb", type=float, default=None, help="exit 1 above this many KB per connection")
    p.add_argument("--max-ms", type=float, default=None, help="exit 1 if a probe takes longer")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    if args.connections < 1 or args.batch < 1 or args.probes < 1:
        p.error("--connections, --batch and --probes must be at least 1")
    # each end is in its own process: ours holds the client sockets, the server (inheriting) the others
    why = raise_nofile(args.connections + FD_MARGIN)
    if why:
        print(f"idle: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="monomail-idle-") as tmp:
        try:
            result = c.run_loop(amain(args, Path(tmp)))
        except RuntimeError as exc:
            print(f"idle: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(c.finite(result)))
    else:
        print(f"{result['date']}, {result['loop']}: {result['connections']} of {args.connections} idle connections "
              f"(opened in {result['open_seconds']} s): RSS {result['rss_before_kb']} -> {result['rss_after_kb']} KB, "
              f"{result['kb_per_connection']} KB per connection; {result['closed_by_server']} closed by the server")
        print(f"{result['probes']} of {args.probes} messages meanwhile: median {result['probe_ms']['median']} ms, "
              f"max {result['probe_ms']['max']} ms; delivered {result['delivered']} of {result['expected']} "
              f"(with the warm-up); server exit {result['server_exit']}")
        for text, n in result["failures"].items():
            print(f"  failed x{n}: {text}")
    bad = (result["connections"] != args.connections or result["probes"] != args.probes
           or result["closed_by_server"] or result["delivered"] != result["expected"] or result["server_exit"] != 0)
    if args.max_kb is not None and not result["kb_per_connection"] <= args.max_kb:
        bad = True
    if args.max_ms is not None and not result["probe_ms"]["max"] <= args.max_ms:
        bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
