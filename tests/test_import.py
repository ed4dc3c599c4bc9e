"""`monomail import`: /etc/aliases, virtusertable and .forward files in, monomail.toml out.

The sample files below hold what real ones hold (comments, continuation lines, nested
aliases, ``:include:`` files, pipes, files, quoted targets, ``\\user``, catch-alls and
``error:`` lines). The output is checked three ways: the report names every item left
behind by file and line; the TOML loads with tomllib and passes `monomail.config.parse`;
and routing each input address through the generated config reaches the mailboxes and
remote addresses that sendmail would have delivered to.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from monomail import config as config_mod
from monomail.envelope import Address
from monomail.errors import ConfigError, RouteError
from monomail.importer import ImportResult, convert
from monomail.router import Mailbox, Remote, resolve

DOMAIN = "example.com"

ALIASES = """\
# /etc/aliases
# Basic system aliases -- these MUST be present.
MAILER-DAEMON:\tpostmaster
postmaster:\troot

# Pseudo accounts.
bin:\t\troot
daemon:\t\troot
root:\t\tadmin, \\ops\t# the admins read root's mail
admin:\t\talice,
\t\tbob@example.net,
    # an indented comment inside a continuation
\t\tCarol
staff:\t\tadmin, "dave", "|/usr/bin/procmail -m /etc/procmailrc"
dave:\t\t\\dave, dave@home.example.net
archive:\t/var/spool/mail-archive
pipe-only:\t"|/usr/bin/vacation x"
uses-pipe-only:\tpipe-only, erin
friends:\t:include:friends.list, :include:/nonexistent/list, Frank
owner-friends:\talice
friends-request: owner-friends
weird:\t\t"John Smith", alice@localhost
ops-team:\t\\admin
tagged:\t\talice+lists
Bad Name: alice
list:\t\t|/usr/local/bin/mailman, /var/log/list
"""

FRIENDS = """\
# the friends list
alice, george@example.org
  henry   # trailing comment
"|/bin/cat"
"""

VIRTUSERTABLE = """\
# virtual domains
info@example.org\talice
sales@example.org\tstaff
Sales2@Example.ORG\tdan@partner.example.net
@example.org\t\tbob@example.net
spam@example.org\terror:nouser No such user here
root@shop.example\tadmin
@shop.example\t\terror:5.1.1:550 User unknown
@old.example.net\t%1@example.net
webmaster@example.com\tstaff
"""

ALICE_FORWARD = '\\alice, alice@mobile.example.net\n# on holiday\n"|/usr/bin/vacation alice"\n'
GRACE_FORWARD = "grace@elsewhere.example.com, /home/grace/mbox-copy\n"

NOT_BUILT = "config sections not built yet"


@dataclass
class Inputs:
    aliases: Path
    friends: Path
    virtusertable: Path
    alice: Path
    grace: Path

    def convert(self, **kw: Any) -> ImportResult:
        args: dict[str, Any] = {"aliases": self.aliases, "virtusertable": self.virtusertable,
                                "forwards": [("alice", self.alice), ("Grace", self.grace)], "domain": DOMAIN}
        return convert(**{**args, **kw})


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    etc = tmp_path / "etc"
    etc.mkdir()
    files = Inputs(etc / "aliases", etc / "friends.list", etc / "virtusertable",
                   tmp_path / "alice.forward", tmp_path / "grace.forward")
    files.aliases.write_text(ALIASES)
    files.friends.write_text(FRIENDS)
    files.virtusertable.write_text(VIRTUSERTABLE)
    files.alice.write_text(ALICE_FORWARD)
    files.grace.write_text(GRACE_FORWARD)
    return files


def parse(data: dict[str, Any]) -> config_mod.Config:
    return config_mod.parse(data, Path("/x/monomail.toml"))


def parse_full(text: str) -> config_mod.Config:
    """The whole generated config; xfail while [virtual]/[forward] are unknown keys."""
    try:
        return parse(tomllib.loads(text))
    except ConfigError as exc:
        if exc.message == "unknown key" and exc.key.split(".")[0] in ("virtual", "forward"):
            pytest.xfail(NOT_BUILT)
        raise


def route(cfg: config_mod.Config, address: str) -> tuple[set[str], set[str]]:
    """(mailbox user names, remote addresses) that ``address`` reaches."""
    dests = resolve(Address.from_str(address), cfg)
    return ({d.user for d in dests if isinstance(d, Mailbox)},
            {d.address for d in dests if isinstance(d, Remote)})


# -- the report -------------------------------------------------------------------------


def test_report_names_every_untranslatable_item_by_file_and_line(inputs: Inputs):
    report = inputs.convert().report
    a, f, v = inputs.aliases, inputs.friends, inputs.virtusertable
    expected = [
        (f"{a}:14:", '"|/usr/bin/procmail -m /etc/procmailrc" (pipe to a program) not translated'),
        (f"{a}:16:", '"/var/spool/mail-archive" (delivery to a file) not translated'),
        (f"{a}:16:", 'alias "archive" has no translatable targets; left out'),
        (f"{a}:17:", '"|/usr/bin/vacation x" (pipe to a program) not translated'),
        (f"{a}:17:", 'alias "pipe-only" has no translatable targets; left out'),
        (f"{a}:18:", '"pipe-only" left out with the alias pipe-only'),
        (f"{a}:19:", '":include:/nonexistent/list" include file not found'),
        (f"{a}:22:", '"John Smith" is not a valid user name'),
        (f"{a}:23:", '"\\admin": admin is also an alias'),
        (f"{a}:25:", '"Bad Name: alice"'),
        (f"{a}:26:", '"|/usr/local/bin/mailman" (pipe to a program) not translated'),
        (f"{a}:26:", '"/var/log/list" (delivery to a file) not translated'),
        (f"{a}:26:", 'alias "list" has no translatable targets; left out'),
        (f"{f}:4:", '"|/bin/cat" (pipe to a program) not translated'),
        (f"{v}:9:", '"%1@example.net" (%n substitution) not translated'),
        (f"{v}:9:", "virtual domain old.example.net has no translated entries"),
        (f"{inputs.alice}:3:", '"|/usr/bin/vacation alice" (pipe to a program) not translated'),
        (f"{inputs.grace}:1:", '"/home/grace/mbox-copy" (delivery to a file) not translated'),
    ]
    assert len(report) == len(expected), "\n".join(report)
    for line, (where, text) in zip(report, expected, strict=True):
        assert line.startswith(where + " ") and text in line, line
    assert all("\n" not in line for line in report)


def test_the_report_is_repeated_as_comments_at_the_end(inputs: Inputs):
    result = inputs.convert()
    tail = result.toml.split("# Not translated:\n", 1)[1]
    assert tail.splitlines() == [f"#   {line}" for line in result.report]
    assert f"# {len(result.report)} item(s) could not be translated" in result.toml


# -- the TOML ---------------------------------------------------------------------------


def test_toml_tables(inputs: Inputs):
    result = inputs.convert()
    assert result.toml.startswith("# monomail.toml fragment generated by `monomail import` from:\n")
    for path in (inputs.aliases, inputs.virtusertable, inputs.alice, inputs.grace):
        assert str(path) in result.toml.split("\n\n", 1)[0]  # named in the header
    data = tomllib.loads(result.toml)
    assert set(data) == {"local", "users", "aliases", "virtual", "forward"}
    assert data["local"] == {"domains": [DOMAIN]}
    assert data["users"] == {n: {} for n in ("alice", "carol", "dave", "erin", "frank", "grace", "henry", "ops")}
    assert data["aliases"] == {
        "mailer-daemon": ["postmaster"],
        "postmaster": ["root"],
        "bin": ["root"],
        "daemon": ["root"],
        "root": ["admin", "ops"],  # \ops: a login account
        "admin": ["alice", "bob@example.net", "carol"],  # continuation lines; Carol lower-cased
        "staff": ["admin", "dave"],  # the pipe left out
        "dave": ["dave", "dave@home.example.net"],  # \dave: the user dave, as monomail spells it
        "uses-pipe-only": ["erin"],
        "friends": ["alice", "george@example.org", "henry", "frank"],  # the include inlined
        "owner-friends": ["alice"],
        "friends-request": ["owner-friends"],
        "weird": ["alice"],  # alice@localhost is alice
        "ops-team": ["admin"],
        "tagged": ["alice+lists@example.com"],
        "webmaster": ["staff"],  # virtusertable entry of the local domain
    }
    assert data["virtual"] == {
        "example.org": {"info": ["alice"], "sales": ["staff"], "sales2": ["dan@partner.example.net"],
                        "*": ["bob@example.net"], "spam": [":fail: 5.1.1 No such user here"]},
        "shop.example": {"root": ["admin"], "*": [":fail: 5.1.1 User unknown"]},  # sendmail's error: lines
    }
    assert data["forward"] == {
        "alice": {"to": ["alice@mobile.example.net"], "keep_copy": True},
        "grace": {"to": ["grace@elsewhere.example.com"], "keep_copy": False},
    }


def test_output_is_deterministic_and_sorted(inputs: Inputs):
    first, second = inputs.convert(), inputs.convert()
    assert first == second
    data = tomllib.loads(first.toml)
    for table in (data["users"], data["aliases"], data["virtual"], data["virtual"]["example.org"], data["forward"]):
        assert list(table) == sorted(table)


def test_config_accepts_local_users_and_aliases(inputs: Inputs):
    data = tomllib.loads(inputs.convert().toml)
    del data["virtual"], data["forward"]
    cfg = parse(data)
    assert cfg.warnings == ()
    assert cfg.local.domains == {DOMAIN}
    assert set(cfg.users) == set(data["users"]) and set(cfg.aliases) == set(data["aliases"])


def test_config_accepts_virtual_and_forward(inputs: Inputs):
    cfg = parse_full(inputs.convert().toml)
    assert set(cfg.virtual) == {"example.org", "shop.example"}
    assert cfg.virtual["example.org"]["*"] == ("bob@example.net",)
    assert cfg.forward["alice"].to == ("alice@mobile.example.net",) and cfg.forward["alice"].keep_copy
    assert not cfg.forward["grace"].keep_copy


# -- routing through the generated config -----------------------------------------------

ROOT_MAIL = ({"alice", "carol", "ops"}, {"bob@example.net"})

# What sendmail delivers for each alias of the sample (without the .forward files).
SENDMAIL = {
    "mailer-daemon": ROOT_MAIL,
    "postmaster": ROOT_MAIL,
    "bin": ROOT_MAIL,
    "daemon": ROOT_MAIL,
    "root": ROOT_MAIL,
    "admin": ({"alice", "carol"}, {"bob@example.net"}),
    "staff": ({"alice", "carol", "dave"}, {"bob@example.net", "dave@home.example.net"}),
    "dave": ({"dave"}, {"dave@home.example.net"}),
    "uses-pipe-only": ({"erin"}, set()),
    "friends": ({"alice", "henry", "frank"}, {"george@example.org"}),
    "owner-friends": ({"alice"}, set()),
    "friends-request": ({"alice"}, set()),
    "weird": ({"alice"}, set()),
    "tagged": ({"alice"}, set()),
}
LEFT_OUT = ("archive", "pipe-only", "list")  # only pipes and files: refused, and reported


def test_every_alias_routes_as_sendmail_delivered(inputs: Inputs):
    result = convert(aliases=inputs.aliases, domain=DOMAIN)
    cfg = parse(tomllib.loads(result.toml))
    names = [line.split(":", 1)[0].lower() for line in ALIASES.splitlines()
             if line and not line[0].isspace() and not line.startswith("#") and ":" in line]
    assert set(names) == {*SENDMAIL, *LEFT_OUT, "ops-team", "bad name"}
    for name, expected in SENDMAIL.items():
        assert route(cfg, f"{name}@{DOMAIN}") == expected, name
        assert route(cfg, name.upper()) == expected, name  # bare and upper-case: the same
    for name in LEFT_OUT:
        with pytest.raises(RouteError):
            route(cfg, f"{name}@{DOMAIN}")
    # Reported difference: sendmail would deliver \admin to a login account "admin";
    # monomail expands the alias admin.
    assert route(cfg, f"ops-team@{DOMAIN}") == SENDMAIL["admin"]


def test_virtual_domains_and_forwards_route_as_sendmail_delivered(inputs: Inputs):
    cfg = parse_full(inputs.convert().toml)
    alice = ({"alice"}, {"alice@mobile.example.net"})  # \alice in her .forward keeps a copy
    cases = {
        "alice@example.com": alice,
        "grace@example.com": (set(), {"grace@elsewhere.example.com"}),  # no copy kept
        "info@example.org": alice,
        "INFO@Example.Org": alice,
        "sales@example.org": ({"alice", "carol", "dave"},
                              {"alice@mobile.example.net", "bob@example.net", "dave@home.example.net"}),
        "sales2@example.org": (set(), {"dan@partner.example.net"}),
        "anyone@example.org": (set(), {"bob@example.net"}),  # the catch-all
        "root@shop.example": ({"alice", "carol"}, {"alice@mobile.example.net", "bob@example.net"}),
        "webmaster@example.com": ({"alice", "carol", "dave"},
                                  {"alice@mobile.example.net", "bob@example.net", "dave@home.example.net"}),
    }
    for address, expected in cases.items():
        assert route(cfg, address) == expected, address
    # sendmail's error: lines refuse with their own reply, before any catch-all.
    with pytest.raises(RouteError) as refused:
        route(cfg, "spam@example.org")
    assert str(refused.value.reply) == "550 5.1.1 No such user here"
    with pytest.raises(RouteError) as refused:
        route(cfg, "nobody@shop.example")
    assert str(refused.value.reply) == "550 5.1.1 User unknown"


# -- format details ---------------------------------------------------------------------


def test_quotes_comments_and_includes(tmp_path: Path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "inner").write_text("bob # inner\n:include:../lists/outer\n")
    (tmp_path / "lists" / "outer").write_text(":include:inner\ncarol\n")  # a loop back
    (tmp_path / "aliases").write_text(
        'a: "x#y@example.net", alice # comment\n'
        "b: :include:lists/inner\n"
        "c: Alice Smith <alice@example.net>, (a comment) carol\n"
        "a: bob\n"
        "  orphan\n"
    )
    result = convert(aliases=tmp_path / "aliases")
    data = tomllib.loads(result.toml)
    assert data["aliases"] == {"a": ["x#y@example.net", "alice"], "b": ["bob", "carol"],
                               "c": ["alice@example.net", "carol"]}
    aliases = tmp_path / "aliases"
    assert any(line.startswith(f"{tmp_path / 'lists' / 'outer'}:1: ") and "includes itself" in line
               for line in result.report), result.report
    assert any(line.startswith(f"{aliases}:4: ") and 'alias "a" defined again (first at line 1)' in line
               for line in result.report), result.report


def test_dot_forward_with_only_a_local_copy_needs_no_forward_rule(tmp_path: Path):
    (tmp_path / "f").write_text("\\bob\n")
    (tmp_path / "g").write_text('"|/usr/bin/vacation carol"\n')
    result = convert(forwards=[("bob", tmp_path / "f"), ("carol", tmp_path / "g")])
    data = tomllib.loads(result.toml)
    assert data["users"] == {"bob": {}, "carol": {}} and "forward" not in data
    assert f"{tmp_path / 'g'}: .forward of carol has no translatable targets; left out" in result.report


def test_missing_input_file_raises(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        convert(aliases=tmp_path / "nope")


# -- the command ------------------------------------------------------------------------


def run_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monomail.importer", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)


def test_command_prints_toml_and_report(inputs: Inputs):
    out = run_import("--aliases", str(inputs.aliases), "--virtusertable", str(inputs.virtusertable),
                     "--forward", f"alice={inputs.alice}", "--forward", f"Grace={inputs.grace}",
                     "--domain", DOMAIN)
    assert out.returncode == 0, out.stderr
    assert out.stdout == inputs.convert().toml
    tomllib.loads(out.stdout)
    assert out.stderr.splitlines() == [f"monomail import: {line}" for line in inputs.convert().report]


def test_command_aliases_only(inputs: Inputs):
    out = run_import("--aliases", str(inputs.aliases))
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["local"] == {"domains": ["localhost"]}
    assert out.stderr and all(line.startswith("monomail import: ") for line in out.stderr.splitlines())


def test_command_missing_file_is_one_line_and_exit_2(tmp_path: Path):
    missing = tmp_path / "no-such-aliases"
    out = run_import("--aliases", str(missing))
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [f"monomail import: {missing}: no such file"]


def test_imported_aliases_route_the_same_through_monomail_route(tmp_path: Path) -> None:
    """Acceptance: `monomail import` on an /etc/aliases with includes and comments gives TOML
    that `monomail route` (the real commands) routes the way sendmail would."""
    (tmp_path / "staff.list").write_text("# the staff\nalice\ncarol@partner.test  # external\n")
    aliases = tmp_path / "aliases"
    aliases.write_text(
        "# /etc/aliases\n"
        "postmaster: root\n"
        "root: admin\n"
        "admin: alice,\n"
        "\tbob\n"
        "staff: :include:staff.list, dave\n"
        "webmaster: \"|/usr/local/bin/handler\", admin  # pipe is dropped\n"
    )
    run = [sys.executable, "-m", "monomail"]
    out = subprocess.run([*run, "import", "--aliases", str(aliases), "--domain", "example.test"],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pipe to a program" in out.stderr
    config = tmp_path / "monomail.toml"
    config.write_text(out.stdout + '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
                      '[remote]\nsmarthost = "127.0.0.1:9"\n')
    expected = {
        "postmaster": {"alice", "bob"},
        "root": {"alice", "bob"},
        "staff": {"alice", "dave", "carol@partner.test"},
        "webmaster": {"alice", "bob"},
    }
    for name, want in expected.items():
        r = subprocess.run([*run, "route", "-c", str(config), f"{name}@example.test"],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        got = set(re.findall(r"user (\w+) \(users\.\w+\) ->", r.stdout))
        got |= set(re.findall(r"^\s*(\S+@partner\.test): remote", r.stdout, re.MULTILINE))
        assert got == want, (name, r.stdout)


def test_what_does_not_parse_is_reported_never_made_into_users(tmp_path: Path):
    (tmp_path / "aliases").write_text(
        "odd: :fail: 4.2.1 Not permanent at all\n"  # a :fail: with a temporary status
        'open: "unclosed quote, alice\n'
        "mixed: bob, :fail: This user has left, carol\n"  # the :fail: answers for all of mixed
        "bin: /dev/null, alice\n"  # /dev/null beside others delivers nothing: left out
    )
    (tmp_path / "fwd").write_text(":fail: not from a .forward\nCarol Smith <carol@example.net>\n")
    result = convert(aliases=tmp_path / "aliases", forwards=[("dave", tmp_path / "fwd")])
    data = tomllib.loads(result.toml)
    assert data["users"] == {"alice": {}, "dave": {}}
    assert data["aliases"] == {"mixed": [":fail: 5.1.1 This user has left, carol"], "bin": ["alice"]}
    assert data["forward"] == {"dave": {"to": ["carol@example.net"], "keep_copy": False}}
    a = tmp_path / "aliases"
    assert result.report == (
        f'{a}:1: ":fail: 4.2.1 Not permanent at all" not understood (:fail: refuses for good: its status is '
        "5.x.x (:defer: is for 4.x.x)); left out",
        f'{a}:1: alias "odd" has no translatable targets; left out',
        f'{a}:2: ""unclosed quote, alice" not understood (a quote is not closed); left out',
        f'{a}:2: alias "open" has no translatable targets; left out',
        f'{a}:3: "bob" left out: ":fail: This user has left, carol" answers for all of mixed, as Exim reads it',
        f'{tmp_path / "fwd"}:1: ":fail: not from a .forward" not translated (a monomail forward delivers; '
        "it cannot refuse or discard)",
    )
