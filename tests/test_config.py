"""monomail.toml checking, through the real ``monomail check-config`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, cli, write_config

from monomail.config import load
from monomail.settings import Discard, Refusal


def test_bundled_config_is_valid():
    out = cli("check-config", "-c", str(ROOT / "monomail.toml"))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path):
    cfg = load(write_config(tmp_path))
    assert cfg.server.spool_dir == tmp_path / "spool"
    assert cfg.local.mail_dir == tmp_path / "mail"
    assert cfg.users["bob"].path == tmp_path / "mail" / "bob"
    assert cfg.users["bob"].mailbox_format == "mbox" and cfg.users["alice"].mailbox_format == "maildir"


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('[server]\nmax_recipents = 10\n', "server.max_recipents", "unknown key"),
        ('[server]\nmax_recipients = "ten"\n', "server.max_recipients", "expected an integer"),
        ('hostnme = "x"\n', "hostnme", "unknown key"),
        ('[local]\nmailbox_format = "mh"\n', "local.mailbox_format", "expected one of"),
        ('[server]\nlisten = ["localhost"]\n', "server.listen", "host:port"),
        ('[server]\ntrusted_networks = ["10.0.0.0/33"]\n', "server.trusted_networks", "network"),
        ('[users.alice]\nmailbox_fromat = "mbox"\n', "users.alice.mailbox_fromat", "unknown key"),
        ('[users."../etc"]\n', 'users.../etc', "user name"),
        ('[aliases]\nteam = ["nosuchuser"]\n', "aliases.team", "neither a user nor an alias"),
        ('[users.alice]\n[aliases]\nold = [":fail: gone", "alice"]\n', "aliases.old",
         "':fail: gone' must be the only target"),
        ('[aliases]\nold = [":fail: 4.2.1 gone"]\n', "aliases.old", ":defer: is for 4.x.x"),
        ('[aliases]\nold = [":defer: 5.1.1 gone"]\n', "aliases.old", ":fail: is for 5.x.x"),
        ('[aliases]\nold = [":fail: 550 4.1.1 gone"]\n', "aliases.old", "do not agree"),
        ('[aliases]\nold = [":fail: caf\u00e9 ferm\u00e9"]\n', "aliases.old", "printable ASCII"),
        ('[aliases]\nold = [":bounce: gone"]\n', "aliases.old", "not a special target"),
        ('[aliases]\nold = [":include:/etc/list"]\n', "aliases.old", "not a special target"),
        ('[virtual."shop.test"]\n"*" = [":blackhole:", "x@remote.test"]\n', 'virtual.shop.test.*',
         "must be the only target"),
        ('[queue]\nretry = ["soon"]\n', "queue.retry", "duration"),
        ('[server]\ntimeout = true\n', "server.timeout", "duration"),
        ('[server]\nmax_connections = 0\n', "server.max_connections", ">= 1"),
        ('server = 5\n', "server", "expected a table"),
        ('[server]\nuser = "-rf"\n', "server.user", "Unix account name"),
        ('[local]\ntrusted_users = ["a/b"]\n', "local.trusted_users", "Unix account name"),
        ('[local]\nmin_uid = 0\n', "local.min_uid", ">= 1"),
        ('[lmtp]\ntarget = "dovecot"\n', "lmtp.target", "unix:/path/to/socket"),
        ('[lmtp.domains]\n"other.test" = "unix:/run/lmtp"\n', "lmtp.domains.other.test", "not one of"),
        ('[users.alice]\nlmtp = "unix:"\n', "users.alice.lmtp", "unix:/path/to/socket"),
        ('[metrics]\nlisten = "9155"\n', "metrics.listen", "host:port"),
        ('[log]\nformat = "xml"\n', "log.format", "expected one of"),
        ('[log]\nsyslog = "yes"\n', "log.syslog", "true or false"),
    ],
)
def test_check_config_names_the_key(tmp_path: Path, toml: str, key: str, expected: str):
    path = tmp_path / "monomail.toml"
    path.write_text(toml)
    out = cli("check-config", "-c", str(path))
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"config error: {key}: " in line
    assert expected in line


def test_missing_file_and_bad_toml(tmp_path: Path):
    out = cli("check-config", "-c", str(tmp_path / "nope.toml"))
    assert out.returncode == 2 and "no such file" in out.stderr
    (tmp_path / "bad.toml").write_text("[server\n")
    out = cli("check-config", "-c", str(tmp_path / "bad.toml"))
    assert out.returncode == 2 and "not valid TOML" in out.stderr


def test_serve_refuses_a_bad_config_without_traceback(tmp_path: Path):
    (tmp_path / "monomail.toml").write_text('[server]\nmax_message_size = "big"\n')
    out = cli("serve", cwd=tmp_path)
    assert out.returncode == 2
    assert "server.max_message_size" in out.stderr and "Traceback" not in out.stderr


def test_alias_loop_is_a_warning(tmp_path: Path):
    path = tmp_path / "monomail.toml"
    path.write_text('[users.alice]\n[aliases]\na = ["b"]\nb = ["a"]\n')
    out = cli("check-config", "-c", str(path))
    assert out.returncode == 0
    assert "warning: aliases.a: alias loop" in out.stderr


def test_container_config_is_valid():
    out = cli("check-config", "-c", str(ROOT / "deploy" / "container.toml"))
    assert out.returncode == 0, out.stderr
    assert "0.0.0.0:25," in out.stdout
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER " not in dockerfile  # root binds port 25, then server.user = "monomail" takes over
    assert 'user = "monomail"' in (ROOT / "deploy" / "container.toml").read_text()
    assert "COPY deploy/container.toml /etc/monomail/monomail.toml" in dockerfile
    assert 'CMD ["monomail", "serve", "-c", "/etc/monomail/monomail.toml"]' in dockerfile


def test_special_alias_targets(tmp_path: Path):
    path = write_config(tmp_path, aliases={
        "postmaster": ["alice"], "olduser": [":fail: 5.1.1 This user has left"], "later": [":defer:"],
        "sink": [":blackhole:"], "team": ["alice", "olduser"], "drop": ["sink", "alice"],
    }, virtual={"shop.test": {"*": [":fail: No such shop address"], "sales": ["alice"]}})
    cfg = load(path)
    assert cfg.aliases["olduser"] == Refusal(550, "5.1.1", "This user has left")
    assert cfg.aliases["later"] == Refusal(450, "4.2.1", "Try again later")
    assert cfg.aliases["sink"] == Discard()
    assert cfg.virtual["shop.test"]["*"] == Refusal(550, "5.1.1", "No such shop address")
    # Naming a refusing alias among others refuses the whole address: said once, at start-up.
    assert cfg.warnings == ("aliases.team: target 'olduser' refuses its mail (550 5.1.1), so this address "
                            "is refused as a whole; remove 'olduser' to deliver to the others",)
    out = cli("check-config", "-c", str(path))
    assert out.returncode == 0 and "warning: aliases.team: target 'olduser' refuses its mail" in out.stderr


def test_system_accounts_let_targets_name_accounts_but_lists_keep_their_own_names(tmp_path: Path):
    """With local.system_accounts a bare target may be any account name (looked up when
    mail is routed), in aliases, forwards, list members and list owners alike; a list
    address still may not be a declared user or alias."""
    path = tmp_path / "monomail.toml"
    path.write_text('[local]\ndomains = ["example.test"]\nsystem_accounts = true\n'
                    '[users.alice]\n[aliases]\nroot = ["ann"]\n[forward]\nalice = { to = ["bob"] }\n'
                    '[lists.dev]\nmembers = ["carl", "alice"]\nowner = ["dana"]\n')
    cfg = load(path)
    assert cfg.aliases["root"] == ("ann",) and cfg.lists["dev"].owner == ("dana",)
    path.write_text('[local]\ndomains = ["example.test"]\nsystem_accounts = true\n'
                    '[users.alice]\n[lists.alice]\nmembers = ["carl"]\n')
    out = cli("check-config", "-c", str(path))
    assert out.returncode == 2 and "lists.alice.address: 'alice@example.test' is also a user or alias" in out.stderr
    path.write_text('[local]\ndomains = ["example.test"]\n[aliases]\nroot = ["ann"]\n')
    out = cli("check-config", "-c", str(path))  # without system accounts, still a typo caught
    assert out.returncode == 2 and "aliases.root: target 'ann' is neither a user nor an alias" in out.stderr
