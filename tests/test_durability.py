"""Trouble on disk is temporary: the client gets a 4xx (never a false 250, never a 5xx)."""

from __future__ import annotations

import json
import mailbox
import shutil
import smtplib
import time


def _send(port: int, rcpts: list[str]) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        s.mail("me@remote.test")
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        return s.data(b"Subject: disk\r\n\r\nbody\r\n")


def test_unwritable_mailbox_is_journalled_and_retried(serve, tmp_path):
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "carol").write_text("a file where a Maildir folder should be")
    server = serve()
    code, text = _send(server.port, ["carol@example.test", "alice@example.test"])
    assert code == 250 and b"queued as" in text
    (entry,) = (tmp_path / "spool").glob("*.json")
    record = json.loads(entry.read_text())
    states = {r["address"]: r["state"] for r in record["recipients"]}
    assert states == {"carol@example.test": "deferred", "alice@example.test": "delivered"}
    carol = record["recipients"][0]
    assert (carol["reply"]["code"], carol["reply"]["status"]) == (451, "4.3.0")
    assert "carol" in carol["cause"]  # the cause, for the admin: which mailbox and why
    assert entry.with_suffix(".msg").read_bytes().startswith(b"Received: from ")
    # The admin fixes the mailbox; the retry (1s schedule in tests) delivers.
    (tmp_path / "mail" / "carol").unlink()
    deadline = time.monotonic() + 10
    while (entry.exists() or entry.with_suffix(".msg").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not entry.exists() and not entry.with_suffix(".msg").exists()
    assert len(mailbox.Maildir(tmp_path / "mail" / "carol", factory=None, create=False)) == 1
    assert len(mailbox.Maildir(tmp_path / "mail" / "alice", factory=None, create=False)) == 1


def test_spool_failure_answers_451_not_250(serve, tmp_path):
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "carol").write_text("not a folder")  # forces the spool path
    server = serve()
    spool = tmp_path / "spool"
    shutil.rmtree(spool)
    spool.write_text("the spool folder is gone and a file is in its place")
    code, text = _send(server.port, ["carol@example.test"])
    assert (code, text[:5]) == (451, b"4.3.0")
    assert b"spool" not in text.lower() and b"/" not in text  # no causes or paths to the client


class _BrokenTables:
    """Lookup tables that fail in a way nobody classified (a bug, a broken disk driver)."""

    def list_members(self, lst):  # noqa: ANN001, ANN201
        raise RuntimeError("secret /var/spool detail")

    def dot_forward(self, user):  # noqa: ANN001, ANN201
        raise RuntimeError("secret /var/spool detail")


def test_internal_error_reply_is_451_generic(serve, caplog):
    """An error nobody classified answers 451 4.3.0 with generic text (aiosmtpd's default
    leaks the exception and answers a permanent 500); the cause goes to the log only, and
    the session goes on."""
    server = serve(local={"allow_dot_forward": True})
    server.app.server.tables = _BrokenTables()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo()
        s.mail("me@remote.test")
        code, text = s.rcpt("alice@example.test")
        assert (code, text[:6]) == (451, b"4.3.0 ")
        assert b"secret" not in text and b"RuntimeError" not in text
        assert s.noop()[0] == 250
    assert "secret /var/spool detail" in caplog.text
