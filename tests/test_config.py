"""monomail.toml checking, through the real ``monomail check-config`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, cli, write_config

from monomail.config import load


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
        ('[queue]\nretry = ["soon"]\n', "queue.retry", "duration"),
        ('[server]\ntimeout = true\n', "server.timeout", "duration"),
        ('[server]\nmax_connections = 0\n', "server.max_connections", ">= 1"),
        ('server = 5\n', "server", "expected a table"),
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
    assert "0.0.0.0:2525" in out.stdout
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/container.toml /etc/monomail/monomail.toml" in dockerfile
    assert 'CMD ["monomail", "serve", "-c", "/etc/monomail/monomail.toml"]' in dockerfile
