"""Queue by the handful (issue 12, acceptance 6): ``monomail queue delete|hold|release|flush``
with filters, ``queue list --json``.

The spool is a real one, its entries journalled by ``Spool.journal_new`` (the one way
messages enter it) as ``sendmail`` would with no server running; the commands are run
as an admin runs them (``python -m monomail``), their output read back, the spool read
back, and the mail log file read back for the line each change leaves.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, wait_until, write_config

from monomail.config import load
from monomail.spool import Spool

DAY = 86400.0


@pytest.fixture
def site(tmp_path: Path) -> Any:
    """A config with a mail log file (made, as the server would have) and an empty spool."""
    path = write_config(tmp_path, log={"level": "info", "file": str(tmp_path / "mail.log")})
    (tmp_path / "mail.log").write_text("")
    config = load(path)
    spool = Spool(config.server.spool_dir)
    spool.create()

    class Site:
        cfg = str(path)
        log = tmp_path / "mail.log"

        def __init__(self) -> None:
            self.spool = spool

        def add(self, sender: str, *rcpts: str, age: float = 0.0) -> str:
            return spool.journal_new(sender, rcpts, b"Subject: x\n\nx\n", now=time.time() - age).id

        def queue(self, *args: str) -> Any:
            return cli("queue", *args, "-c", self.cfg)

        def ids(self) -> set[str]:
            return set(spool.ids())

    return Site()


def test_delete_by_sender_removes_exactly_those_and_says_how_many(site):
    x = {site.add("x@spam.test", "a@far.test"), site.add("X@Spam.test", "b@far.test", "c@near.test"),
         site.add("x@spam.test", "d@far.test", age=DAY)}
    others = {site.add("y@good.test", "a@far.test"), site.add("", "x@spam.test"),
              site.add("xx@spam.test", "a@far.test")}
    out = site.queue("delete", "--sender", "x@spam.test")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 entries deleted - "), out.stdout
    assert site.ids() == others
    logged = site.log.read_text().splitlines()
    assert len(logged) == 3
    assert {line.split(": ")[1] for line in logged} == x  # "<time> INFO monomail.mail: QID: deleted by ..."
    assert all(re.search(r"monomail\.mail: \w+: deleted by \S+.*\(monomail queue delete\)$", line) for line in logged)


def test_recipient_domain_and_age_filters(site):
    to_bob = site.add("a@x.test", "bob@far.test", "carol@near.test")
    far_old = site.add("a@x.test", "dan@far.test", age=3 * DAY)
    near = site.add("a@x.test", "erin@near.test", age=2 * 3600)
    bounce = site.add("", "a@x.test", age=10 * DAY)

    out = site.queue("hold", "--recipient", "<BOB@far.test>")
    assert out.returncode == 0 and out.stdout.startswith("1 entry held"), out
    assert [e for e in (to_bob, far_old, near, bounce) if site.spool.load(e).hold] == [to_bob]

    out = site.queue("hold", "--domain", "far.test", "--older-than", "1d")  # filters combine: AND
    assert out.stdout.startswith("1 entry held"), out
    assert site.spool.load(far_old).hold and not site.spool.load(near).hold

    out = site.queue("release", "--domain", "FAR.test")
    assert out.stdout.startswith("2 entries released"), out
    assert not any(site.spool.load(e).hold for e in (to_bob, far_old))

    out = site.queue("flush", "--older-than", "1h")
    assert out.stdout.startswith("3 entries due now"), out

    out = site.queue("delete", "--sender", "<>")
    assert out.stdout.startswith("1 entry deleted"), out
    assert bounce not in site.ids()

    out = site.queue("delete", "--domain", "nowhere.test")
    assert out.returncode == 0 and out.stdout.startswith("0 entries deleted"), out
    assert len(site.ids()) == 3

    out = site.queue("delete", "--all")
    assert out.stdout.startswith("3 entries deleted"), out
    assert site.ids() == set()
    words = [line.split(": ", 2)[2].split(" by ")[0] for line in site.log.read_text().splitlines()]
    assert words == ["held"] * 2 + ["released"] * 2 + ["made due now"] * 3 + ["deleted"] * 4


def test_ids_and_a_filter_together_and_ids_not_there(site):
    a = site.add("a@x.test", "bob@far.test")
    b = site.add("b@x.test", "bob@far.test")
    out = site.queue("delete", a, b, "--sender", "a@x.test")  # an id must also pass the filter
    assert out.stdout.startswith("1 entry deleted"), out
    assert site.ids() == {b}
    gone = "0" * 21
    out = site.queue("hold", b, gone)
    assert out.returncode == 1 and f"no queue entry {gone}" in out.stderr, out
    assert out.stdout.startswith("1 entry held") and site.spool.load(b).hold


@pytest.mark.parametrize("command", ["delete", "hold", "release"])
def test_neither_id_nor_filter_is_a_usage_error(site, command):
    kept = site.add("a@x.test", "bob@far.test")
    out = site.queue(command)
    assert out.returncode == 2 and "give queue ids or a filter" in out.stderr, out
    assert site.ids() == {kept} and not site.spool.load(kept).hold
    assert site.log.read_text() == ""


def test_a_bad_duration_is_a_usage_error(site):
    site.add("a@x.test", "bob@far.test")
    out = site.queue("delete", "--older-than", "soon")
    assert out.returncode == 2 and "--older-than" in out.stderr and "Traceback" not in out.stderr, out
    assert len(site.ids()) == 1


def test_list_json_is_one_object_a_line(site):
    first = site.add("a@x.test", "bob@far.test", "carol@near.test")
    second = site.add("", "a@x.test")
    site.queue("hold", second)
    out = site.queue("list", "--json")
    assert out.returncode == 0, out.stderr
    objects = [json.loads(line) for line in out.stdout.splitlines()]
    by_id = {o["queue_id"]: o for o in objects}
    assert set(by_id) == {first, second}
    one = by_id[first]
    assert one["sender"] == "a@x.test" and one["held"] is False and one["size"] > 0
    assert [r["address"] for r in one["recipients"]] == ["bob@far.test", "carol@near.test"]
    assert all(r["state"] == "deferred" and r["attempts"] == 0 for r in one["recipients"])
    assert by_id[second]["sender"] == "" and by_id[second]["held"] is True
    assert abs(one["received_at"] - time.time()) < 60


def test_list_json_of_an_empty_queue_prints_nothing(site):
    out = site.queue("list", "--json")
    assert out.returncode == 0 and out.stdout == ""


def test_a_running_server_is_told_and_logs_to_the_same_file(process_server, tmp_path):
    server = process_server(log={"level": "info", "file": str(tmp_path / "mail.log")},
                            queue={"retry": ["1h"]}, remote={"port": 9, "connect_timeout": "1s"})
    spool = Spool(load(server.config_path).server.spool_dir)
    qid = spool.journal_new("a@x.test", ("bob@far.test",), b"Subject: x\n\nx\n", now=time.time() + 3600).id
    out = cli("queue", "delete", "--domain", "far.test", "-c", str(server.config_path))
    assert out.returncode == 0 and out.stdout.strip() == f"1 entry deleted - server (pid {server.proc.pid}) notified"
    logfile = tmp_path / "mail.log"
    wait_until(lambda: "queue reloaded" in logfile.read_text())
    assert re.search(rf"monomail\.mail: {qid}: deleted by \S+", logfile.read_text())
    assert server.terminate() == 0
