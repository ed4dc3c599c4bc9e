"""Idle connections (issue 13, acceptance 4): memory per idle connection, and a normal client's
latency while thousands of connections are held open.

One `monomail serve` (subprocess, temp dir, one Maildir user, ``server.max_connections`` above
the load, 127.0.0.0/8 trusted so the per-client limit does not apply). This process raises its
own ``RLIMIT_NOFILE`` (and the server's, which inherits it) to the hard limit, opens
``--connections`` (10,000) connections to the server in batches, reads each one's 220 banner
(so the server has made its session and written to it), and holds them idle. The server's RSS
(``VmRSS`` of ``/proc/PID/status``) is read before the first connection and after the last, each
time after a short settle; per connection = the difference / the number held. Then, with all
of them still open, a normal client sends ``--probes`` (20) whole messages one after another,
each on a new connection (connect, banner, EHLO, MAIL, RCPT, DATA, QUIT), timed from connect to
the reply of QUIT, and the Maildir must hold them all.

    python bench/idle.py                            # 10,000 connections, about 20 s
    python bench/idle.py --connections 2000 --json

Only 127.0.0.1 is used. Exit status 1 if a connection or probe failed, the Maildir count does not
match, or (with ``--max-kb``/``--max-ms``) a figure is above its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as c

HOST = "127.0.0.1"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def hold(port: int, count: int, batch: int) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        banner = await asyncio.wait_for(reader.readline(), 30)
        if not banner.startswith(b"220"):
            raise RuntimeError(f"banner {banner!r}")
        writers.append(writer)

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return writers


async def probe(port: int, index: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)

    async def reply() -> bytes:
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            if line[3:4] != b"-":
                return line

    async def say(line: bytes, want: bytes) -> None:
        writer.write(line)
        got = await reply()
        if not got.startswith(want):
            raise RuntimeError(f"{line!r} -> {got!r}")

    if not (await reply()).startswith(b"220"):
        raise RuntimeError("no banner")
    await say(b"EHLO probe.example.net\r\n", b"250")
    await say(b"MAIL FROM:<probe@example.net>\r\n", b"250")
    await say(b"RCPT TO:<bob@example.test>\r\n", b"250")
    await say(b"DATA\r\n", b"354")
    await say(c.data_payload(c.message_lines(index, 2048, "idle", "bob@example.test", "probe")), b"250")
    await say(b"QUIT\r\n", b"221")
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def amain(args: object, work: Path) -> dict[str, object]:
    port = c.free_port(HOST)
    c.write_monomail_config(work, hostname="idle.bench.test", listen=f"{HOST}:{port}",
                            max_connections=args.connections + 100, user="bob",  # type: ignore[attr-defined]
                            server_extra='timeout = "30m"\ncommand_timeout = "30m"\n')
    procs: list = []
    server = c.start_server([sys.executable, "-m", "monomail", "serve", "-c", str(work / "monomail.toml")],
                            HOST, port, work, "monomail", procs)
    try:
        await asyncio.sleep(1.0)
        before = rss_kb(server.pid)
        started = time.perf_counter()
        writers = await hold(port, args.connections, args.batch)  # type: ignore[attr-defined]
        opened = time.perf_counter() - started
        await asyncio.sleep(2.0)
        after = rss_kb(server.pid)
        latencies = [await probe(port, i) for i in range(args.probes)]  # type: ignore[attr-defined]
        still = rss_kb(server.pid)
        for w in writers:
            w.close()
        deadline = time.monotonic() + 10
        maildir = work / "mail" / "bob" / "new"
        while time.monotonic() < deadline and len(list(maildir.iterdir()) if maildir.is_dir() else []) < args.probes:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        delivered = len(list(maildir.iterdir())) if maildir.is_dir() else 0
    finally:
        for proc in procs:
            c.stop_server(proc)
    held = len(writers)
    return {
        "connections": held, "open_seconds": round(opened, 2),
        "rss_before_kb": before, "rss_after_kb": after, "rss_after_probes_kb": still,
        "kb_per_connection": round((after - before) / held, 2),
        "probe_ms": {"median": round(statistics.median(latencies) * 1000, 1),
                     "max": round(max(latencies) * 1000, 1)},
        "probes": len(latencies), "delivered": delivered, "loop": c.loop_name(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10000, help="idle connections to hold (default 10000)")
    p.add_argument("--batch", type=int, default=500, help="connections opened at once (default 500)")
    p.add_argument("--probes", type=int, default=20, help="messages sent meanwhile (default 20)")
    p.add_argument("--max-kb", type=float, default=None, help="exit 1 above this many KB per connection")
    p.add_argument("--max-ms", type=float, default=None, help="exit 1 if a probe takes longer")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections * 2 + 1000  # both ends live on this machine: ours and, inherited, the server's
    if hard != resource.RLIM_INFINITY and hard < need:
        print(f"RLIMIT_NOFILE hard limit {hard} is below {need}: raise it (ulimit -Hn) or ask for fewer",
              file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="monomail-idle-") as tmp:
        result = c.run_loop(amain(args, Path(tmp)))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['connections']} idle connections (opened in {result['open_seconds']} s, {result['loop']}): "
              f"RSS {result['rss_before_kb']} -> {result['rss_after_kb']} KB, "
              f"{result['kb_per_connection']} KB per connection")
        print(f"{result['probes']} messages meanwhile: median {result['probe_ms']['median']} ms, "  # type: ignore[index]
              f"max {result['probe_ms']['max']} ms; delivered {result['delivered']}")  # type: ignore[index]
    bad = result["delivered"] != args.probes
    if args.max_kb is not None and result["kb_per_connection"] > args.max_kb:  # type: ignore[operator]
        bad = True
    if args.max_ms is not None and result["probe_ms"]["max"] > args.max_ms:  # type: ignore[index]
        bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
