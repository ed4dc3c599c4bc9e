"""One address-list lexer, seen through every face that reads a list (issue 8, defects 6 and 7).

A ``.forward`` file is read the same way when a running server delivers through it and
when ``monomail import`` translates it. An /etc/aliases refusal (``:error:``, ``:fail:``,
``:defer:``, ``:blackhole:``, ``/dev/null``) goes through ``monomail import`` into a
config that a running server answers at RCPT time with exactly that code and text, and
that ``monomail route`` shows. Real servers on loopback, real clients (smtplib), real
commands; mailboxes read back with the stdlib ``mailbox`` module.
"""

from __future__ import annotations

import mailbox
import os
import smtplib
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli, write_config
from peers import SMTPPeer

MSG = b"From: Poster <poster@outside.test>\r\nSubject: lists\r\n\r\nbody\r\n"

# Defect 6: phrases, comments, quotes and \user in one real .forward file.
FORWARD = """\
# carol's forward
bob@remote.test, Carol Smith <carol@remote.test>
"dave@remote.test" (Dave at home), \\carol
"""
FORWARDED = {"bob@remote.test", "carol@remote.test", "dave@remote.test"}

# Defect 7: refusals in /etc/aliases, in the forms sendmail and Exim admins write.
ALIASES = """\
postmaster: alice
olduser: :error:5.1.1 This user has left
gone:     :fail: Gone away, no forwarding address
moving:   :defer: 4.2.1 Mailbox moving, try tomorrow
sm-style: error:5.1.6:550 Moved to bob@example.test
nobody:   /dev/null
sink:     :blackhole:
team:     alice, olduser
"""


def run_import(*args: str, cwd: Path) -> tuple[dict[str, Any], str]:
    out = cli("import", *args, "--domain", "example.test", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return tomllib.loads(out.stdout), out.stderr


def rcpt(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        assert s.mail("poster@outside.test")[0] == 250
        return s.rcpt(address)


def send(port: int, rcpts: list[str]) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        assert s.mail("poster@outside.test")[0] == 250
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        return s.data(MSG)


def maildir(path: Path) -> list[bytes]:
    if not (path / "new").is_dir():
        return []
    md = mailbox.Maildir(path, factory=None, create=False)
    return [md.get_bytes(k) for k in md.iterkeys()]


# -- defect 6: .forward read one way, at delivery and by monomail import --------------------


@pytest.fixture
def peer(dns, port):
    dns.mx("remote.test", (10, "mx.peer.test"))
    dns.a("mx.peer.test", "127.0.0.2")
    p = SMTPPeer("127.0.0.2", port).start()
    yield p
    p.stop()


def test_dot_forward_with_phrases_is_read_the_same_at_delivery_and_by_import(serve, dns, port, peer,
                                                                             tmp_path: Path):
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    dot_forward = tmp_path / "mail" / "carol" / ".forward"
    dot_forward.write_text(FORWARD)

    # Delivery through a running server that honours .forward files.
    server = serve(local={"allow_dot_forward": True},
                   dns={"nameservers": [dns.address], "timeout": "2s"},
                   remote={"port": port, "connect_timeout": "2s"})
    assert rcpt(server.port, "carol@example.test")[0] == 250  # no local names "carol", "smith"
    code, text = send(server.port, ["carol@example.test"])
    assert code == 250, text
    delivered = {r for m in peer.wait_for(1) for r in m.rcpt_tos}
    assert delivered == FORWARDED
    assert len(maildir(tmp_path / "mail" / "carol")) == 1  # \carol: a copy kept

    # monomail import of the same file: the same addresses, the same copy.
    data, report = run_import("--forward", f"carol={dot_forward}", cwd=tmp_path)
    assert set(data["forward"]["carol"]["to"]) == FORWARDED
    assert data["forward"]["carol"]["keep_copy"] is True
    assert set(data["users"]) == {"carol"} and report == ""

    # ... and `monomail route` of the imported rule reaches what the server delivered to.
    config = write_config(tmp_path / "mail", forward=data["forward"],
                          dns={"nameservers": [dns.address], "timeout": "2s"}, remote={"port": port})
    out = cli("route", "-c", str(config), "carol@example.test")
    assert out.returncode == 0, out.stdout + out.stderr
    assert {a for a in FORWARDED if f"{a}: remote remote.test" in out.stdout} == FORWARDED


def test_dot_forward_items_that_are_not_addresses_are_logged_not_delivered(serve, dns, port, peer,
                                                                          tmp_path: Path, caplog):
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    (tmp_path / "mail" / "carol" / ".forward").write_text(
        '"|/usr/bin/vacation carol", /var/mail/carol.copy\n:fail: not here\n"unclosed, bob@remote.test\n'
        "bob@remote.test\n")
    server = serve(local={"allow_dot_forward": True},
                   dns={"nameservers": [dns.address], "timeout": "2s"},
                   remote={"port": port, "connect_timeout": "2s"})
    assert send(server.port, ["carol@example.test"])[0] == 250
    assert {r for m in peer.wait_for(1) for r in m.rcpt_tos} == {"bob@remote.test"}
    ignored = [r.getMessage() for r in caplog.records if r.name == "monomail.tables"]
    assert any("vacation" in m for m in ignored) and any("carol.copy" in m for m in ignored)
    assert any(":fail: not here" in m for m in ignored) and any("unclosed" in m for m in ignored)


# -- defect 7: refusals imported, configured, answered at RCPT time, shown by route ----------


@pytest.fixture
def imported(tmp_path: Path) -> tuple[dict[str, Any], str]:
    (tmp_path / "aliases").write_text(ALIASES)
    return run_import("--aliases", str(tmp_path / "aliases"), cwd=tmp_path)


def test_import_turns_refusals_into_refusals_never_into_users(imported, tmp_path: Path):
    data, report = imported
    assert set(data["users"]) == {"alice"}  # not "this", "user", "has", "left"
    assert data["aliases"] == {
        "postmaster": ["alice"],
        "olduser": [":fail: 5.1.1 This user has left"],
        "gone": [":fail: 5.1.1 Gone away, no forwarding address"],  # commas and all, as Exim reads it
        "moving": [":defer: 4.2.1 Mailbox moving, try tomorrow"],
        "sm-style": [":fail: 5.1.6 Moved to bob@example.test"],
        "nobody": [":blackhole:"],
        "sink": [":blackhole:"],
        "team": ["alice"],  # olduser would refuse all of team: left out, and reported
    }
    aliases = tmp_path / "aliases"
    assert report.splitlines() == [
        f'monomail import: {aliases}:8: "olduser" left out of team: alias olduser refuses its mail, '
        "and monomail would refuse the whole address for it"]


def test_imported_refusals_are_answered_at_rcpt_time(imported, serve, tmp_path: Path):
    data, _ = imported
    server = serve(local={"domains": data["local"]["domains"]}, users={"alice": {}}, aliases=data["aliases"])
    assert server.config.warnings == ()
    assert rcpt(server.port, "olduser@example.test") == (550, b"5.1.1 This user has left")
    assert rcpt(server.port, "OldUser@example.test") == (550, b"5.1.1 This user has left")
    assert rcpt(server.port, "olduser+tag@example.test") == (550, b"5.1.1 This user has left")
    assert rcpt(server.port, "gone@example.test") == (550, b"5.1.1 Gone away, no forwarding address")
    assert rcpt(server.port, "moving@example.test") == (450, b"4.2.1 Mailbox moving, try tomorrow")
    assert rcpt(server.port, "sm-style@example.test") == (550, b"5.1.6 Moved to bob@example.test")
    # :blackhole: and /dev/null: accepted, delivered nowhere, nothing left in the spool.
    assert send(server.port, ["nobody@example.test", "sink@example.test"])[0] == 250
    assert send(server.port, ["team@example.test"])[0] == 250
    time.sleep(0.3)
    assert len(maildir(server.config.users["alice"].path)) == 1  # team's copy only
    assert not list(server.config.server.spool_dir.glob("*.json"))


def test_route_shows_the_refusal_and_exits_2(imported, tmp_path: Path):
    data, _ = imported
    config = write_config(tmp_path, local={"domains": ["example.test"]}, users={"alice": {}},
                          aliases=data["aliases"])
    out = cli("route", "-c", str(config), "olduser@example.test")
    assert out.returncode == 2
    assert "olduser@example.test: alias olduser (:fail:) (aliases.olduser): FAILS 550 5.1.1 This user has left" \
        in out.stdout
    out = cli("route", "-c", str(config), "moving@example.test")
    assert out.returncode == 2 and "FAILS 450 4.2.1 Mailbox moving, try tomorrow" in out.stdout
    out = cli("route", "-c", str(config), "sink@example.test", "team@example.test")
    assert out.returncode == 0, out.stdout
    assert "sink@example.test: alias sink: discarded (:blackhole:) (aliases.sink)" in out.stdout


def test_refusal_through_sendmail_bs_too(imported, tmp_path: Path):
    """`sendmail -bs` asks the same router: the same reply."""
    data, _ = imported
    config = write_config(tmp_path, local={"domains": ["example.test"]}, users={"alice": {}},
                          aliases=data["aliases"])
    session = b"EHLO x\r\nMAIL FROM:<poster@outside.test>\r\nRCPT TO:<olduser@example.test>\r\nQUIT\r\n"
    env = {**os.environ, "MONOMAIL_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "monomail", "sendmail", "-bs"], input=session,
                         capture_output=True, timeout=30, env=env)
    assert b"550 5.1.1 This user has left\r\n" in out.stdout, out.stdout + out.stderr


def test_a_defer_alias_met_at_delivery_time_is_temporary(tmp_path: Path):
    """A :defer: reached when the message is delivered (not at RCPT: here through the MDA)
    is a temporary failure: exit 75, so the calling MTA keeps the message; never a bounce."""
    path = write_config(tmp_path, aliases={"postmaster": ["alice"], "moving": [":defer: 4.2.1 Moving, try later"],
                                           "gone": [":fail: 5.1.1 This user has left"]})
    message = b"From: a@example.test\nSubject: x\n\nhello\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for user in ("moving", "gone"):
        argv = [sys.executable, "-m", "monomail", "deliver", "-c", str(path), "-u", user, "-f", "a@x.test"]
        run = subprocess.run(argv, input=message, capture_output=True, timeout=30, cwd=tmp_path, env=env)
        results[user] = (run.returncode, run.stderr.decode())
    assert results["moving"][0] == 75, results
    assert "4.2.1 Moving, try later" in results["moving"][1]
    assert results["gone"][0] == 67, results
