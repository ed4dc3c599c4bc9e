"""Per-user recipes applied to real deliveries through the server.

Mail goes in over SMTP; the folders the recipes name are read back with the stdlib
``mailbox`` module; forwards made by recipes are captured by an SMTP peer on loopback.
"""

from __future__ import annotations

import email
import logging
import mailbox
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, write_config
from peers import DNSServer, SMTPPeer


def msg(subject: str, sender: str = "friend@outside.test", body: str = "hello") -> bytes:
    return f"From: {sender}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def send(server, data: bytes, rcpt: str = "alice@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("friend@outside.test", [rcpt], data) == {}


def maildir_subjects(path: Path) -> list[str]:
    if not (path / "new").is_dir():
        return []
    box = mailbox.Maildir(path, factory=None, create=False)
    return sorted(email.message_from_bytes(box.get_bytes(k))["Subject"] for k in box.iterkeys())


def mbox_subjects(path: Path) -> list[str]:
    return sorted(m["Subject"] for m in mailbox.mbox(path)) if path.exists() else []


def start(serve, tmp_path: Path, recipes: str, user: str = "alice", **overrides):
    home = tmp_path / "mail" / user
    home.mkdir(parents=True, exist_ok=True)
    (home / ".procmailrc").write_text(recipes)
    filters = {"enabled": True, **overrides.pop("filters", {})}
    return serve(filters=filters, **overrides), home


def test_recipes_sort_into_mbox_and_maildir_folders(serve, tmp_path):
    recipes = (
        "LOGFILE=$HOME/procmail.log\n"
        ":0:\n* ^Subject:.*urgent\nurgent\n\n"
        ":0\n* ^From:.*@lists\\.test\nlists/\n\n"
        ":0 c\n* ^Subject:.*copy\ncopies\n"
    )
    server, home = start(serve, tmp_path, recipes)
    send(server, msg("very urgent"))
    send(server, msg("digest", sender="news@lists.test"))
    send(server, msg("please copy"))
    send(server, msg("plain"))
    assert mbox_subjects(home / "urgent") == ["very urgent"]
    assert maildir_subjects(home / "lists") == ["digest"]
    assert mbox_subjects(home / "copies") == ["please copy"]
    assert maildir_subjects(home) == ["plain", "please copy"]  # the default mailbox (c: a copy too)
    first = next(iter(mailbox.mbox(home / "urgent")))
    assert first["Return-Path"] == "<friend@outside.test>" and first["Delivered-To"] == "alice@example.test"
    assert "Folder: urgent" in (home / "procmail.log").read_text()


def test_recipe_syntax_error_goes_to_default_mailbox(serve, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="monomail.filters")
    server, home = start(serve, tmp_path, ":0\n* ^Subject:.*x\n{\n  spam\n")  # unclosed block
    send(server, msg("x marks"))
    assert maildir_subjects(home) == ["x marks"]
    assert "recipe file broken" in caplog.text and ".procmailrc" in caplog.text
    assert list(home.iterdir()) and not (home / "spam").exists()


def test_unwritable_folder_and_escape_attempt_fall_through(serve, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="monomail.filters")
    recipes = (
        ":0\n* ^Subject:.*blocked\nblocked/\n\n"  # a file sits where the Maildir folder should be
        ":0\n* ^Subject:.*escape\n../../outside-home\n"  # outside the user's home: refused
    )
    server, home = start(serve, tmp_path, recipes)
    (home / "blocked").write_text("not a folder")
    send(server, msg("blocked one"))
    send(server, msg("escape attempt"))
    assert maildir_subjects(home) == ["blocked one", "escape attempt"]
    assert not (tmp_path / "outside-home").exists()


def test_hanging_pipe_is_killed_and_mail_goes_to_default(serve, tmp_path):
    recipes = ":0 w\n* ^Subject:.*slow\n| /bin/sleep 30\n"
    server, home = start(serve, tmp_path, recipes, filters={"allow_pipes": ["alice"], "pipe_timeout": "1s"})
    t0 = time.monotonic()
    send(server, msg("slow one"))
    assert time.monotonic() - t0 < 10
    assert maildir_subjects(home) == ["slow one"]


def test_pipes_run_only_for_allowed_users(serve, tmp_path):
    out = tmp_path / "mail" / "alice" / "piped.txt"
    recipes = f":0 w\n* ^Subject:.*pipe\n| /usr/bin/tee {out}\n"
    server, home = start(serve, tmp_path, recipes)  # alice is not in allow_pipes
    send(server, msg("pipe me"))
    assert not out.exists() and maildir_subjects(home) == ["pipe me"]


def test_pipe_filter_and_program_for_allowed_user(serve, tmp_path):
    out = tmp_path / "mail" / "alice" / "piped.txt"
    recipes = (
        ":0 fbw\n| /usr/bin/tr a-z A-Z\n\n"  # filter: upper-case the body
        f":0 c\n| /usr/bin/tee {out}\n"
    )
    server, home = start(serve, tmp_path, recipes, filters={"allow_pipes": ["alice"]})
    send(server, msg("filter", body="quiet words"))
    wait = time.monotonic() + 5
    while not out.exists() and time.monotonic() < wait:
        time.sleep(0.05)
    assert b"QUIET WORDS" in out.read_bytes()
    (key,) = mailbox.Maildir(home, factory=None, create=False).keys()
    assert b"QUIET WORDS" in mailbox.Maildir(home, factory=None, create=False).get_bytes(key)


def test_recipe_forward_leaves_through_the_queue(serve, tmp_path):
    dns = DNSServer().start()
    port = free_port()
    dns.mx("remote.test", (10, "mx.remote.test"))
    dns.a("mx.remote.test", "127.0.0.2")
    peer = SMTPPeer("127.0.0.2", port).start()
    try:
        recipes = ":0 c\n* ^Subject:.*forward\n! alice@remote.test\n"
        server, home = start(serve, tmp_path, recipes, dns={"nameservers": [dns.address], "timeout": "2s"},
                             remote={"port": port})
        send(server, msg("please forward"))
        (got,) = peer.wait_for(1)
        assert got.rcpt_tos == ["alice@remote.test"]
        assert got.mail_from == "alice@example.test"  # a foreign sender is rewritten on forwards
        assert b"Subject: please forward" in got.data
        assert maildir_subjects(home) == ["please forward"]  # c: the copy stays too
    finally:
        peer.stop()
        dns.stop()


def test_monomail_deliver_applies_recipes(tmp_path):
    home = tmp_path / "mail" / "alice"
    home.mkdir(parents=True)
    (home / ".procmailrc").write_text(":0\n* ^Subject:.*sorted\nsorted/\n")
    cfg = write_config(tmp_path, filters={"enabled": True})
    out = subprocess.run([sys.executable, "-m", "monomail", "deliver", "-c", str(cfg), "-u", "alice",
                          "-f", "someone@outside.test"], input=msg("sorted by mda"), capture_output=True,
                         timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert maildir_subjects(home / "sorted") == ["sorted by mda"]


@pytest.mark.parametrize("user", ["bob"])
def test_mbox_user_default_and_home(serve, tmp_path, user):
    home = tmp_path / "mail" / f".{user}"  # an mbox user's default home
    home.mkdir(parents=True)
    (home / ".procmailrc").write_text(":0:\n* ^Subject:.*keep\nkept\n")
    server = serve(filters={"enabled": True})
    send(server, msg("keep this"), rcpt=f"{user}@example.test")
    send(server, msg("other"), rcpt=f"{user}@example.test")
    assert mbox_subjects(home / "kept") == ["keep this"]
    assert mbox_subjects(tmp_path / "mail" / user) == ["other"]
