"""Side by side: Postfix and monomail on the same load from the same client (issue 13, acceptance 1).

One run starts, on loopback only:

- a counting aiosmtpd sink on 127.0.0.2 (``relay.py --serve-sink``: it stores nothing and
  answers ``XCOUNT`` with its counters), the "remote" server both relay cases deliver to;
- a private Postfix (``tests/postfix.PostfixPeer``: Debian's package, config, queue and log under
  the temp folder, ``inet_interfaces = 127.0.0.1``, no DNS) with Postfix's own default
  durability: ``example.test`` is a virtual mailbox domain delivered by ``virtual(8)`` into the
  Maildir ``<tmp>/postfix/vmail/example.test/bench/`` (owned by ``nobody``; no host account is
  touched), everything else relayed with ``relayhost = [127.0.0.2]:<sink>`` (no TLS offered by the
  sink, ``smtp_tls_security_level = may``);
- ``monomail serve`` (subprocess) with user ``bench`` of ``example.test`` in a Maildir and
  ``remote.smarthost = "127.0.0.2:<sink>"`` for everything else.

The client is Postfix's ``smtp-source`` for both servers, with the same message file (``-F``,
about ``--size`` bytes), ``-s SESSIONS -m MESSAGES``, and ``-d`` ("don't disconnect after sending
a message") for the reused-connection cases; without ``-d`` every message gets a new connection.
Four cases per server: ``maildir-new``, ``maildir-reused`` (``-t bench@example.test``),
``relay-new``, ``relay-reused`` (``-t user@sink.test``). The clock starts when smtp-source starts
and stops when the last message is in the Maildir's ``new/`` (files counted) or counted by the
sink, polled every 5 ms. CPU seconds per message are the server's: for Postfix the sum over the
master and all its live children of utime+stime, plus the master's cutime+cstime (children that
exited meanwhile), read from ``/proc`` before and after; for monomail its one process the same way.
The sink's and smtp-source's CPU are not counted.

Rounds are interleaved (round 1 of every case and server, then round 2 ...); the median of
``--rounds`` is reported with the ratio monomail/Postfix. Where Postfix cannot start (not root,
not installed) it says why and measures monomail alone.

Usage::

    python bench/sidebyside.py [--messages 3000] [--sessions 10] [--size 2048] [--rounds 2]
                               [--case maildir-new ...] [--no-postfix] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    EHLO_NAME,
    SENDER,
    add_output_options,
    finite,
    free_port,
    loop_name,
    progress,
    run_benchmark,
    start_server,
    stop_server,
    write_monomail_config,
)
from relay import SINK_HOST, SMTP_SOURCE, aiosmtpd_sink_count, message_lines

CLIENT_HOST = "127.0.0.1"
USER = "bench"
LOCAL_DOMAIN = "example.test"
REMOTE_RCPT = "user@sink.test"
CASES = ("maildir-new", "maildir-reused", "relay-new", "relay-reused")
SERVERS = ("postfix", "monomail")
VIRTUAL_UID = 65534  # nobody: owns Postfix's virtual Maildir
POLL = 0.005


# -- CPU of a process tree -------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu(root: int | None) -> float:
    """CPU seconds of ``root`` and its live children (utime+stime) plus the reaped children's
    (``root``'s cutime+cstime). Postfix's daemons are children of its master; monomail is one process."""
    if root is None:
        return float("nan")
    ticks = 0
    own = _stat(root)
    if own is None:
        return float("nan")
    ticks += int(own[11]) + int(own[12]) + int(own[13]) + int(own[14])
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != root:
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == root:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- servers ---------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    pid: Callable[[], int | None]  # root of the process tree whose CPU is counted
    maildir_new: Path


def postfix_peer_class() -> Any:
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import postfix

    return postfix


def start_postfix(workdir: Path, sink_port: int, closers: list[Callable[[], None]]) -> Server:
    mod = postfix_peer_class()
    base = workdir / "postfix"
    vmail = base / "vmail"
    vmail.mkdir(parents=True)
    os.chown(vmail, VIRTUAL_UID, VIRTUAL_UID)
    peer = mod.PostfixPeer(
        (SINK_HOST, sink_port), base=base, name="postfix-bench",
        main={
            "virtual_mailbox_domains": LOCAL_DOMAIN,
            "virtual_mailbox_base": str(vmail),
            "virtual_mailbox_maps": f"static:{LOCAL_DOMAIN}/{USER}/",  # trailing slash: Maildir
            "virtual_uid_maps": f"static:{VIRTUAL_UID}",
            "virtual_gid_maps": f"static:{VIRTUAL_UID}",
            "virtual_mailbox_limit": "0",  # the default (51200000) is below PostfixPeer's message_size_limit
            "smtp_tls_security_level": "may",
            "default_process_limit": "100",
        },
        services="virtual   unix  -  n  n  -  -  virtual\n",
    )
    closers.append(peer.stop)
    peer.start()
    progress(f"postfix: {peer.postconf('-h', 'mail_version').strip()} on {peer.host}:{peer.port}, "
             f"master pid {peer.master_pid()}")
    return Server("postfix", peer.port, peer.master_pid, vmail / LOCAL_DOMAIN / USER / "new")


def start_monomail(workdir: Path, sink_port: int, sessions: int,
                   procs: list[subprocess.Popen[bytes]]) -> tuple[Server, subprocess.Popen[bytes]]:
    directory = workdir / "monomail"
    directory.mkdir(parents=True)
    port = free_port(CLIENT_HOST)
    config = write_monomail_config(
        directory, hostname="mx.example.test", listen=f"{CLIENT_HOST}:{port}",
        max_connections=max(100, 2 * sessions + 10), user=USER,
        sections=f"""\
[dns]
nameservers = ["{CLIENT_HOST}:{free_port(CLIENT_HOST)}"]
timeout = "5s"

[remote]
smarthost = "{SINK_HOST}:{sink_port}"
tls = "opportunistic"
max_connections = {max(50, sessions)}
max_connections_per_domain = {max(10, sessions)}

""")
    proc = start_server([sys.executable, "-m", "monomail", "serve", "-c", str(config)], CLIENT_HOST, port,
                        directory, "monomail", procs)
    progress(f"monomail: on {CLIENT_HOST}:{port}, pid {proc.pid}, loop {loop_name()}")
    return Server("monomail", port, lambda: proc.pid, directory / "mail" / USER / "new"), proc


# -- one measurement ---------------------------------------------------------------------


@dataclass
class Run:
    server: str
    case: str
    messages: int
    arrived: int
    seconds: float
    rate: float
    cpu_s: float
    cpu_ms_per_msg: float
    ok: bool
    note: str


def count_files(folder: Path) -> int:
    try:
        return len(os.listdir(folder))
    except FileNotFoundError:
        return 0


async def measure(server: Server, case: str, messages: int, args: Any, message_file: Path,
                  sink_port: int) -> Run:
    maildir = case.startswith("maildir")
    rcpt = f"{USER}@{LOCAL_DOMAIN}" if maildir else REMOTE_RCPT

    async def arrived_total() -> int:
        if maildir:
            return count_files(server.maildir_new)
        return (await aiosmtpd_sink_count(sink_port))[0]

    cmd = [SMTP_SOURCE, "-s", str(args.sessions), "-m", str(messages), "-F", str(message_file),
           "-M", EHLO_NAME, "-f", SENDER, "-t", rcpt]
    if case.endswith("reused"):
        cmd.append("-d")
    cmd.append(f"{CLIENT_HOST}:{server.port}")
    before = await arrived_total()
    c0 = tree_cpu(server.pid())
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    note = ""
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), args.max_seconds)
        if proc.returncode != 0:
            lines = out.decode("utf-8", "replace").strip().splitlines()
            note = f"smtp-source exit {proc.returncode}: {(lines or [''])[-1][:160]}"
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        note = f"smtp-source stopped after {args.max_seconds:.0f}s"
    got = await arrived_total() - before
    while got < messages and time.perf_counter() - t0 < args.max_seconds:
        # the Maildir is counted every POLL; the sink (a round trip) a little less often
        await asyncio.sleep(POLL if maildir else 4 * POLL)
        got = await arrived_total() - before
    elapsed = time.perf_counter() - t0
    cpu = tree_cpu(server.pid()) - c0
    if got < messages and not note:
        note = f"only {got} of {messages} arrived within {args.max_seconds:.0f}s"
    return Run(server.name, case, messages, got, round(elapsed, 4), got / elapsed if elapsed else 0.0,
               round(cpu, 3), 1000 * cpu / got if got else float("nan"), got == messages and not note, note)


# -- results -----------------------------------------------------------------------------


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for server in SERVERS:
        for case in CASES:
            rs = [r for r in runs if r.server == server and r.case == case]
            if rs:
                rows.append({"server": server, "case": case,
                             "msgs_per_s": statistics.median(r.rate for r in rs),
                             "cpu_ms_per_msg": statistics.median(r.cpu_ms_per_msg for r in rs),
                             "rounds": [round(r.rate, 1) for r in rs], "ok": all(r.ok for r in rs)})
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by = {(r["server"], r["case"]): r for r in rows}
    out = {}
    for case in CASES:
        mono, pf = by.get(("monomail", case)), by.get(("postfix", case))
        if mono and pf and pf["msgs_per_s"]:
            out[case] = {"rate": mono["msgs_per_s"] / pf["msgs_per_s"],
                         "cpu_per_msg": mono["cpu_ms_per_msg"] / pf["cpu_ms_per_msg"]}
    return out


def print_table(rows: list[dict[str, Any]], rat: dict[str, dict[str, float]], cases: list[str]) -> None:
    by = {(r["server"], r["case"]): r for r in rows}
    width = 16
    print(f"{'':22}" + "".join(f"{c:>{width}}" for c in cases))
    for server in SERVERS:
        if not any((server, c) in by for c in cases):
            continue
        print(f"{server + ' msgs/s':22}" + "".join(
            f"{by[(server, c)]['msgs_per_s']:>{width}.0f}" if (server, c) in by else f"{'-':>{width}}"
            for c in cases))
        print(f"{server + ' CPU ms/msg':22}" + "".join(
            f"{by[(server, c)]['cpu_ms_per_msg']:>{width}.2f}" if (server, c) in by else f"{'-':>{width}}"
            for c in cases))
    if rat:
        print(f"{'monomail/postfix rate':22}" + "".join(
            f"{rat[c]['rate']:>{width - 1}.2f}x" if c in rat else f"{'-':>{width}}" for c in cases))
        print(f"{'monomail/postfix CPU':22}" + "".join(
            f"{rat[c]['cpu_per_msg']:>{width - 1}.2f}x" if c in rat else f"{'-':>{width}}" for c in cases))


# -- main --------------------------------------------------------------------------------


async def amain(args: Any, workdir: Path, procs: list[subprocess.Popen[bytes]],
                closers: list[Callable[[], None]]) -> int:
    if not os.access(SMTP_SOURCE, os.X_OK):
        raise RuntimeError(f"{SMTP_SOURCE} is not installed (Debian: apt-get install postfix); "
                           "it is the client for both servers")
    sink_port = free_port(SINK_HOST)
    start_server([sys.executable, str(Path(__file__).resolve().parent / "relay.py"), "--serve-sink",
                  str(sink_port)], SINK_HOST, sink_port, workdir / "sink", "sink", procs)
    progress(f"sink: aiosmtpd (counting, storing nothing) on {SINK_HOST}:{sink_port}")
    servers: list[Server] = []
    postfix_note = ""
    if args.no_postfix:
        postfix_note = "Postfix not measured (--no-postfix)"
    else:
        reason = postfix_peer_class().postfix_unavailable()
        if reason:
            postfix_note = f"Postfix not measured: {reason}"
        else:
            try:
                servers.append(start_postfix(workdir, sink_port, closers))
            except (RuntimeError, OSError) as exc:
                postfix_note = f"Postfix not measured: it did not start: {str(exc)[:400]}"
    if postfix_note:
        progress(postfix_note)
    mono, mono_proc = start_monomail(workdir, sink_port, args.sessions, procs)
    servers.append(mono)

    message_file = workdir / "message.txt"
    message_file.write_text("\n".join(message_lines(0, args.size, "sbs", [REMOTE_RCPT])) + "\n")
    size = message_file.stat().st_size + message_file.read_text().count("\n")  # with CRLF

    runs: list[Run] = []
    if args.warmup:
        for server in servers:
            for case in args.cases:
                run = await measure(server, case, args.warmup, args, message_file, sink_port)
                progress(f"  warm-up {server.name:8} {case:15} {run.rate:7.0f} msg/s"
                         + ("" if run.ok else f"  FAILED: {run.note}"))
                if not run.ok:
                    raise RuntimeError(f"{server.name} {case} warm-up failed: {run.note}")
    for r in range(args.rounds):
        for case in args.cases:
            for server in servers:
                run = await measure(server, case, args.messages, args, message_file, sink_port)
                runs.append(run)
                progress(f"  round {r + 1}/{args.rounds} {server.name:8} {case:15} {run.rate:7.0f} msg/s "
                         f"{run.cpu_ms_per_msg:6.2f} ms CPU/msg ({run.arrived}/{run.messages} in "
                         f"{run.seconds:.2f}s)" + ("" if run.ok else f"  FAILED: {run.note}"))
                if mono_proc.poll() is not None:
                    raise RuntimeError(f"monomail died (exit {mono_proc.returncode})")
    mono_exit = stop_server(mono_proc)
    rows = summarize(runs)
    rat = ratios(rows)
    ok = all(r.ok for r in runs) and mono_exit == 0
    settings = {"messages": args.messages, "sessions": args.sessions, "size": args.size, "message_bytes": size,
                "rounds": args.rounds, "warmup": args.warmup, "cases": args.cases, "loop": loop_name(),
                "cpus": os.cpu_count(), "machine": platform.platform(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        print(json.dumps(finite({"settings": settings, "postfix_note": postfix_note, "ok": ok,
                                 "monomail_exit": mono_exit, "results": rows, "ratios": rat,
                                 "runs": [asdict(r) for r in runs]}), indent=2))
        return 0 if ok else 1
    print(f"\n{settings['date']}, {os.cpu_count()} CPUs, {settings['machine']}; smtp-source -s {args.sessions} "
          f"-m {args.messages}, messages of {size} bytes, median of {args.rounds} round(s), monomail on "
          f"{loop_name()}; clock stopped when the last message was in new/ or counted by the sink; "
          "CPU = the server's process tree")
    print_table(rows, rat, args.cases)
    if postfix_note:
        print(postfix_note)
    for r in runs:
        if not r.ok:
            print(f"  FAILED {r.server}/{r.case}: {r.note}")
    print(f"monomail: exit {mono_exit}; all runs complete: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000, help="messages per measurement (default 3000)")
    p.add_argument("--sessions", type=int, default=10, help="smtp-source sessions, -s (default 10)")
    p.add_argument("--size", type=int, default=2048, help="approximate message size in bytes (default 2048)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the median is reported (default 2)")
    p.add_argument("--warmup", type=int, default=100, help="untimed messages per server and case (default 100)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="bound of one measurement (default 120)")
    p.add_argument("--case", dest="cases", action="append", choices=CASES, help="repeatable; default all four")
    p.add_argument("--no-postfix", action="store_true", help="measure monomail alone")
    add_output_options(p, "keep the temporary directory (configs, logs, Maildirs)")
    args = p.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1 or args.warmup < 0 or args.size < 512:
        p.error("--messages, --sessions, --rounds must be at least 1, --warmup not negative, --size at least 512")
    args.cases = [c for c in CASES if c in (args.cases or CASES)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("sidebyside", "monomail-sidebyside-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs, closers))


if __name__ == "__main__":
    sys.exit(main())
