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

``--before PATH`` (issue 13, acceptance 3: CPU per message before and after) adds a third server,
"monomail before": ``monomail serve`` run from another checkout of the project (the root of a git
checkout or worktree, e.g. ``git worktree add /tmp/before <commit>``) with ``PYTHONPATH=PATH`` and
the same Python, on the same cases in the same rounds, with its ratios to Postfix and
monomail/before. The commit of each monomail (``git rev-parse --short HEAD`` in its checkout, and
"+modified" if its ``monomail/`` differs from that commit) is printed.

``--strace`` (acceptance 2: the same durability) counts the sync system calls of every server
(``fsync``, ``fdatasync``, ``sync_file_range``, ``syncfs``, ``sync``, ``msync``) with
``strace -c -f`` attached (``-p``) to the server's whole process tree, every thread (Postfix: its
master and all its descendants, and with ``-f`` every process the master forks meanwhile), over a
separate short run after the timed rounds: ``--strace-messages`` (1000) messages of
``--strace-case`` (``maildir-reused``; repeatable). strace stays attached until the message count
is reached and the server's queue (Postfix) or spool (monomail) is empty, then it is stopped with
SIGINT, which detaches it from every process; each process is checked to be no longer traced. It
prints those calls per message for each server. strace slows the traced server a lot, so these runs
are not timed; a server that batches fsyncs across messages may batch differently when slowed.

Usage::

    python bench/sidebyside.py [--messages 3000] [--sessions 10] [--size 2048] [--rounds 2]
                               [--case maildir-new ...] [--no-postfix] [--before PATH]
                               [--strace [--strace-case maildir-reused ...] [--strace-messages 1000]]
                               [--json] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
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
    wait_ready,
    write_monomail_config,
)
from relay import SINK_HOST, SMTP_SOURCE, aiosmtpd_sink_count, message_lines

CLIENT_HOST = "127.0.0.1"
USER = "bench"
LOCAL_DOMAIN = "example.test"
REMOTE_RCPT = "user@sink.test"
CASES = ("maildir-new", "maildir-reused", "relay-new", "relay-reused")
SERVERS = ("postfix", "monomail", "monomail-before")
LABELS = {"postfix": "postfix", "monomail": "monomail", "monomail-before": "monomail before"}
# (numerator, denominator) of the ratio rows: after vs Postfix, before vs Postfix, after vs before
PAIRS = (("monomail", "postfix"), ("monomail-before", "postfix"), ("monomail", "monomail-before"))
VIRTUAL_UID = 65534  # nobody: owns Postfix's virtual Maildir
POLL = 0.005
ROOT = Path(__file__).resolve().parent.parent  # this checkout: the "monomail" measured
STRACE = "/usr/bin/strace"
SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync", "msync")


# -- processes in /proc -----------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state is [0], ppid [1])."""
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


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (processes; their threads are found by strace ``-f``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tracers(pid: int) -> set[int] | None:
    """The ``TracerPid`` of every thread of ``pid`` (0: not traced); None when it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found = set()
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("TracerPid:"):
                    found.add(int(line.split()[1]))
    return found


# -- servers ---------------------------------------------------------------------------


@dataclass
class Server:
    name: str  # one of SERVERS
    port: int
    pid: Callable[[], int | None]  # root of the process tree whose CPU (and syncs) are counted
    maildir_new: Path
    settled: Callable[[], bool]  # nothing left in its queue or spool
    proc: subprocess.Popen[bytes] | None = None  # monomail's (Postfix daemonizes)
    root: Path | None = None  # monomail's checkout
    commit: str = ""


def postfix_peer_class() -> Any:
    tests = str(ROOT / "tests")
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
    return Server("postfix", peer.port, peer.master_pid, vmail / LOCAL_DOMAIN / USER / "new", peer.queue_empty)


def checkout_commit(root: Path) -> str:
    """``git rev-parse --short HEAD`` of the checkout ``root``, "+modified" when its ``monomail/`` is not
    that commit (uncommitted changes or new files)."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = git("status", "--porcelain", "--", "monomail").stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return head.stdout.strip() + ("+modified" if dirty else "")


def spool_empty(spool: Path) -> bool:
    try:
        return not any(n.endswith((".json", ".msg")) and not n.startswith(".") for n in os.listdir(spool))
    except FileNotFoundError:
        return True


def start_monomail(workdir: Path, sink_port: int, sessions: int, procs: list[subprocess.Popen[bytes]],
                   name: str, root: Path) -> Server:
    """``monomail serve`` of the checkout ``root`` (``PYTHONPATH=root``, this Python) in ``workdir/name``."""
    directory = workdir / name
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
    env = {**os.environ, "PYTHONPATH": str(root)}
    found = subprocess.run([sys.executable, "-c", "import monomail; print(monomail.__file__)"], env=env,
                           cwd=directory, capture_output=True, text=True, timeout=60)
    where = Path(found.stdout.strip() or "?").resolve()
    if found.returncode != 0 or not where.is_relative_to(root):
        raise RuntimeError(f"{name}: {sys.executable} with PYTHONPATH={root} imports monomail from {where}, "
                           f"not from that checkout: {found.stderr.strip()[-400:]}")
    log_path = directory / f"{name}.log"
    with log_path.open("ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "monomail", "serve", "-c", str(config)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=directory, env=env,
                                start_new_session=True)
    procs.append(proc)
    wait_ready(proc, CLIENT_HOST, port, log_path, label=f"{name} (monomail serve of {root})")
    commit = checkout_commit(root)
    progress(f"{LABELS[name]}: {commit} ({root}) on {CLIENT_HOST}:{port}, pid {proc.pid}, loop {loop_name()}")
    return Server(name, port, lambda: proc.pid, directory / "mail" / USER / "new",
                  lambda: spool_empty(directory / "spool"), proc, root, commit)


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


# -- sync calls under strace -------------------------------------------------------------


@dataclass
class SyncCount:
    server: str
    case: str
    messages: int
    arrived: int
    processes: int  # processes of the server's tree attached at the start (strace -f adds the new ones)
    calls: dict[str, int]  # SYNC_CALLS -> calls over the whole run, all processes and threads
    per_message: dict[str, float]
    total_per_message: float
    ok: bool
    note: str


def parse_strace_summary(text: str) -> dict[str, int]:
    """``strace -c -U name,calls`` output -> calls of each of SYNC_CALLS (0 when absent)."""
    calls = dict.fromkeys(SYNC_CALLS, 0)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in calls and parts[1].isdigit():
            calls[parts[0]] = int(parts[1])
    return calls


def stop_strace(proc: subprocess.Popen[bytes]) -> str:
    """SIGINT (strace detaches from every tracee and writes its summary); SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return "strace did not stop within 30 s of SIGINT (killed)"
    return ""


async def count_syncs(server: Server, case: str, messages: int, args: Any, message_file: Path, sink_port: int,
                      workdir: Path, closers: list[Callable[[], None]]) -> SyncCount:
    """``messages`` of ``case`` to ``server`` with ``strace -c -f`` attached to its whole process tree."""
    name = f"{server.name}-{case}"
    root = server.pid()
    pids = tree_pids(root) if root is not None else []
    summary, log = workdir / f"strace-{name}.txt", workdir / f"strace-{name}.log"
    cmd = [STRACE, "-c", "-f", "-U", "name,calls", "-o", str(summary), "-e", "trace=" + ",".join(SYNC_CALLS)]
    for pid in pids:
        cmd += ["-p", str(pid)]
    with log.open("wb") as logf:
        strace = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)

    def detach() -> None:
        stop_strace(strace)

    closers.insert(0, detach)  # on an abort, detach before the servers are stopped
    note, arrived = "", 0
    try:
        deadline = time.monotonic() + 20
        # the tree listed afresh: a process forked between the listing and the master's attach is missed
        while pending := [p for p in (tree_pids(root) if root is not None else [])
                          if (t := tracers(p)) is not None and t != {strace.pid}
                          and (_stat(p) or ["Z"])[0] != "Z"]:  # a zombie (exited, not yet reaped) cannot be
            if strace.poll() is not None or time.monotonic() > deadline:
                note = f"strace did not attach to pids {pending[:10]}: {log.read_text(errors='replace')[-400:]}"
                break
            await asyncio.sleep(0.02)
        if not note:
            run = await measure(server, case, messages, args, message_file, sink_port)
            arrived, note = run.arrived, run.note
            settle_by = time.monotonic() + args.max_seconds
            while not server.settled() and time.monotonic() < settle_by:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the last removal's folder fsync, if any
            if not server.settled() and not note:
                note = f"its queue was not empty {args.max_seconds:.0f}s after the last message arrived"
    finally:
        stopped = stop_strace(strace)
        note = note or stopped
    left = [p for p in tree_pids(root) if (tracers(p) or {0}) != {0} or ((_stat(p) or ["?"])[0] in "tT")] \
        if root is not None else []
    if left and not note:
        note = f"processes still traced or stopped after strace exited: {left[:10]}"
    if strace.returncode not in (0, -signal.SIGINT, 128 + signal.SIGINT) and not note:
        note = f"strace exit {strace.returncode}: {log.read_text(errors='replace')[-400:]}"
    calls = parse_strace_summary(summary.read_text(errors="replace") if summary.exists() else "")
    per = {k: v / arrived if arrived else float("nan") for k, v in calls.items()}
    total = sum(calls.values()) / arrived if arrived else float("nan")
    return SyncCount(server.name, case, messages, arrived, len(pids), calls, per, total,
                     arrived == messages and not note, note)


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


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{"monomail/postfix": {case: {"rate": x, "cpu_per_msg": y}}, ...}`` for each of PAIRS measured."""
    by = {(r["server"], r["case"]): r for r in rows}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for num, den in PAIRS:
        for case in CASES:
            a, b = by.get((num, case)), by.get((den, case))
            if a and b and b["msgs_per_s"]:
                out.setdefault(f"{num}/{den}", {})[case] = {
                    "rate": a["msgs_per_s"] / b["msgs_per_s"],
                    "cpu_per_msg": a["cpu_ms_per_msg"] / b["cpu_ms_per_msg"] if b["cpu_ms_per_msg"] else float("nan")}
    return out


LABEL_WIDTH = 30
WIDTH = 16


def print_table(rows: list[dict[str, Any]], rat: dict[str, dict[str, dict[str, float]]], cases: list[str]) -> None:
    by = {(r["server"], r["case"]): r for r in rows}

    def cell(value: Any, fmt: str) -> str:
        return f"{'-':>{WIDTH}}" if value is None else f"{value:>{WIDTH}{fmt}}"

    print(f"{'':{LABEL_WIDTH}}" + "".join(f"{c:>{WIDTH}}" for c in cases))
    for server in SERVERS:
        if not any((server, c) in by for c in cases):
            continue
        for title, key, fmt in ((" msgs/s", "msgs_per_s", ".0f"), (" CPU ms/msg", "cpu_ms_per_msg", ".2f")):
            print(f"{LABELS[server] + title:{LABEL_WIDTH}}"
                  + "".join(cell(by[(server, c)][key] if (server, c) in by else None, fmt) for c in cases))
    for pair, per_case in rat.items():
        num, den = pair.split("/")
        short = f"{num.replace('monomail-', '')}/{den.replace('monomail-', '')}"
        for title, key in ((" rate", "rate"), (" CPU/msg", "cpu_per_msg")):
            print(f"{short + title:{LABEL_WIDTH}}" + "".join(
                f"{per_case[c][key]:>{WIDTH - 1}.2f}x" if c in per_case else f"{'-':>{WIDTH}}" for c in cases))


def print_syncs(counts: list[SyncCount], messages: int) -> None:
    cases = sorted({s.case for s in counts}, key=CASES.index)
    print(f"\nsync calls per message, counted with strace -c -f attached to each server's process tree "
          f"(all processes and threads) over {messages} messages of {', '.join(cases)}, not timed:")
    print(f"{'':{LABEL_WIDTH}}" + "".join(f"{k:>{max(len(k), 6) + 2}}" for k in SYNC_CALLS) + f"{'total':>8}")
    for s in counts:
        label = f"{LABELS[s.server]} {s.case}" if len(cases) > 1 else LABELS[s.server]
        print(f"{label:{LABEL_WIDTH}}" + "".join(f"{s.per_message[k]:>{max(len(k), 6) + 2}.2f}" for k in SYNC_CALLS)
              + f"{s.total_per_message:>8.2f}"
              + ("" if s.ok else f"  FAILED: {s.note}"))


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
    servers.append(start_monomail(workdir, sink_port, args.sessions, procs, "monomail", ROOT))
    if args.before:
        servers.append(start_monomail(workdir, sink_port, args.sessions, procs, "monomail-before", args.before))
    monomails = [s for s in servers if s.proc is not None]

    def check_alive() -> None:
        for s in monomails:
            assert s.proc is not None
            if s.proc.poll() is not None:
                raise RuntimeError(f"{LABELS[s.name]} died (exit {s.proc.returncode})")

    message_file = workdir / "message.txt"
    message_file.write_text("\n".join(message_lines(0, args.size, "sbs", [REMOTE_RCPT])) + "\n")
    size = message_file.stat().st_size + message_file.read_text().count("\n")  # with CRLF

    runs: list[Run] = []
    if args.warmup:
        warm = [c for c in CASES if (args.rounds and c in args.cases) or (args.strace and c in args.strace_cases)]
        for server in servers:
            for case in warm:
                run = await measure(server, case, args.warmup, args, message_file, sink_port)
                progress(f"  warm-up {server.name:15} {case:15} {run.rate:7.0f} msg/s"
                         + ("" if run.ok else f"  FAILED: {run.note}"))
                if not run.ok:
                    raise RuntimeError(f"{server.name} {case} warm-up failed: {run.note}")
    for r in range(args.rounds):
        for case in args.cases:
            for server in servers:
                run = await measure(server, case, args.messages, args, message_file, sink_port)
                runs.append(run)
                progress(f"  round {r + 1}/{args.rounds} {server.name:15} {case:15} {run.rate:7.0f} msg/s "
                         f"{run.cpu_ms_per_msg:6.2f} ms CPU/msg ({run.arrived}/{run.messages} in "
                         f"{run.seconds:.2f}s)" + ("" if run.ok else f"  FAILED: {run.note}"))
                check_alive()
    syncs: list[SyncCount] = []
    if args.strace:
        for case in args.strace_cases:
            for server in servers:
                count = await count_syncs(server, case, args.strace_messages, args, message_file, sink_port,
                                          workdir, closers)
                syncs.append(count)
                progress(f"  strace {server.name:15} {case:15} {count.total_per_message:5.2f} sync calls/msg "
                         + " ".join(f"{k}={v}" for k, v in count.calls.items() if v)
                         + f" ({count.arrived}/{count.messages} messages, {count.processes} processes attached)"
                         + ("" if count.ok else f"  FAILED: {count.note}"))
                check_alive()
    exits = {s.name: stop_server(s.proc) for s in monomails if s.proc is not None}
    rows = summarize(runs)
    rat = ratios(rows)
    ok = all(r.ok for r in runs) and all(s.ok for s in syncs) and all(code == 0 for code in exits.values())
    settings = {"messages": args.messages, "sessions": args.sessions, "size": args.size, "message_bytes": size,
                "rounds": args.rounds, "warmup": args.warmup, "cases": args.cases, "loop": loop_name(),
                "cpus": os.cpu_count(), "machine": platform.platform(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "checkouts": {s.name: {"root": str(s.root), "commit": s.commit} for s in monomails},
                "strace": {"messages": args.strace_messages, "cases": args.strace_cases,
                           "syscalls": list(SYNC_CALLS)} if args.strace else None}
    if args.json:
        print(json.dumps(finite({"settings": settings, "postfix_note": postfix_note, "ok": ok,
                                 "monomail_exit": exits, "results": rows, "ratios": rat,
                                 "sync_calls": [asdict(s) for s in syncs],
                                 "runs": [asdict(r) for r in runs]}), indent=2))
        return 0 if ok else 1
    commits = ", ".join(f"{LABELS[s.name]} {s.commit}" for s in monomails)
    timed = (f"smtp-source -s {args.sessions} -m {args.messages}, median of {args.rounds} round(s); clock stopped "
             "when the last message was in new/ or counted by the sink; CPU = the server's process tree"
             if rows else f"smtp-source -s {args.sessions}, no timed rounds")
    print(f"\n{settings['date']}, {os.cpu_count()} CPUs, {settings['machine']}; {commits}, on {loop_name()}; "
          f"messages of {size} bytes; {timed}")
    if rows:
        print_table(rows, rat, args.cases)
    if postfix_note:
        print(postfix_note)
    for failed in runs:
        if not failed.ok:
            print(f"  FAILED {failed.server}/{failed.case}: {failed.note}")
    if syncs:
        print_syncs(syncs, args.strace_messages)
    print(", ".join(f"{LABELS[name]}: exit {code}" for name, code in exits.items())
          + f"; all runs complete: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000, help="messages per measurement (default 3000)")
    p.add_argument("--sessions", type=int, default=10, help="smtp-source sessions, -s (default 10)")
    p.add_argument("--size", type=int, default=2048, help="approximate message size in bytes (default 2048)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds; the median is reported (default 2; 0 with --strace: only count the syncs)")
    p.add_argument("--warmup", type=int, default=100, help="untimed messages per server and case (default 100)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="bound of one measurement (default 120)")
    p.add_argument("--case", dest="cases", action="append", choices=CASES, help="repeatable; default all four")
    p.add_argument("--no-postfix", action="store_true", help="measure monomail alone")
    p.add_argument("--before", type=Path, metavar="PATH",
                   help="also measure the monomail of this checkout (root of another git checkout or worktree)")
    p.add_argument("--strace", action="store_true",
                   help=f"also count each server's sync calls per message with {STRACE} -c -f, in a separate run")
    p.add_argument("--strace-case", dest="strace_cases", action="append", choices=CASES,
                   help="case of the strace run (repeatable; default maildir-reused)")
    p.add_argument("--strace-messages", type=int, default=1000, help="messages of the strace run (default 1000)")
    add_output_options(p, "keep the temporary directory (configs, logs, Maildirs, strace summaries)")
    args = p.parse_args(argv)
    if (args.messages < 1 or args.sessions < 1 or args.rounds < (0 if args.strace else 1) or args.warmup < 0
            or args.size < 512 or args.strace_messages < 1):
        p.error("--messages, --sessions, --rounds (0 with --strace) and --strace-messages must be at least 1, "
                "--warmup not negative, --size at least 512")
    if args.strace and not os.access(STRACE, os.X_OK):
        p.error(f"--strace needs {STRACE} (Debian: apt-get install strace)")
    if args.strace_cases and not args.strace:
        p.error("--strace-case needs --strace")
    if args.before is not None:
        args.before = args.before.resolve()
        if not (args.before / "monomail" / "__main__.py").is_file():
            p.error(f"--before {args.before}: no monomail/__main__.py there (give the root of a checkout)")
    args.cases = [c for c in CASES if c in (args.cases or CASES)]
    args.strace_cases = [c for c in CASES if c in (args.strace_cases or ["maildir-reused"])]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("sidebyside", "monomail-sidebyside-", args,
                         lambda workdir, procs, closers: amain(args, workdir, procs, closers))


if __name__ == "__main__":
    sys.exit(main())
