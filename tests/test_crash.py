"""kill -9 under load: every message that got a 250 is delivered after restart, none half-written.

The server runs as a real subprocess. Ten sessions send to a Maildir user, an mbox user,
and an mbox user whose mailbox another program holds locked, so that part of the load
goes through the spool (deferred, journalled) and must be resumed after the restart.
"""

from __future__ import annotations

import mailbox
import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

SESSIONS = 10
PER_SESSION = 20
KILL_AT = 80


def _body(tag: str) -> bytes:
    return (f"Subject: crash {tag}\r\nX-Tag: {tag}\r\n\r\n" + f"{tag} payload line\r\n" * 60 + "END\r\n").encode()


def _expected_payload(tag: str) -> str:
    return f"{tag} payload line\n" * 60 + "END\n"


def _load(port: int, acked: list[tuple[str, str]], stop: threading.Event, kill: Callable[[], None]) -> None:
    """Ten sessions; the one that sees the KILL_AT-th 250 kills the server at once."""
    lock = threading.Lock()

    def session(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                for i in range(PER_SESSION):
                    if stop.is_set():
                        return
                    rcpt = ("alice", "bob", "carol")[(n + i) % 3]
                    tag = f"{n:02d}-{i:02d}"
                    if s.sendmail("load@remote.test", [f"{rcpt}@example.test"], _body(tag)) == {}:
                        with lock:
                            acked.append((rcpt, tag))
                            if len(acked) == KILL_AT:
                                kill()  # SIGKILL while the other nine sessions are mid-transaction
                                stop.set()
        except (OSError, smtplib.SMTPException):
            return  # the server died under us: whatever was not acked may be lost

    threads = [threading.Thread(target=session, args=(n,)) for n in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _messages(mail_dir: Path, user: str) -> list[mailbox.Message]:
    path = mail_dir / user
    if user == "alice":
        return list(mailbox.Maildir(path, factory=None, create=False)) if path.exists() else []
    return list(mailbox.mbox(path, create=False)) if path.exists() else []


def test_sigkill_under_load_loses_nothing_acknowledged(process_server, tmp_path):
    overrides = {
        "users": {"alice": {}, "bob": {"mailbox_format": "mbox"}, "carol": {"mailbox_format": "mbox"}},
        "local": {"lock_timeout": "0.05s"},
        "queue": {"retry": ["1s"]},
    }
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    # Another program holds carol's mailbox: her mail is deferred into the spool.
    foreign_lock = mail_dir / "carol.lock"
    foreign_lock.write_text("0\n")  # no pid (dotlockfile, procmail): honoured

    server = process_server(**overrides)
    acked: list[tuple[str, str]] = []
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(server.port, acked, stop, server.kill))
    loader.start()
    loader.join(60)
    assert not loader.is_alive()
    assert server.proc.returncode == -9, "the server must have been killed mid-load"
    assert KILL_AT <= len(acked) < SESSIONS * PER_SESSION
    journalled = list((tmp_path / "spool").glob("*.json"))
    assert journalled, "carol's deferred mail should be in the spool"

    foreign_lock.unlink()  # the other program is done
    server.start()
    deadline = time.monotonic() + 30
    while list((tmp_path / "spool").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((tmp_path / "spool").glob("*.json")), "the restarted server must finish the queue"
    assert server.terminate() == 0

    for user in ("alice", "bob", "carol"):
        msgs = _messages(mail_dir, user)
        for m in msgs:  # nothing half-written, in any mailbox
            assert m.get_payload() == _expected_payload(m["X-Tag"]), f"damaged message in {user}"
        present = {m["X-Tag"] for m in msgs}
        missing = {tag for rcpt, tag in acked if rcpt == user} - present
        assert not missing, f"{user}: acknowledged but lost: {sorted(missing)}"
    assert not (mail_dir / "bob.lock").exists()
