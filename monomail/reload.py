"""Reading the config file again while the server runs (SIGHUP, ``monomail reload``).

Job: the parts of a reload that are not the composition root's own wiring (``app``'s
`App.reload_config` swaps the pieces in one place):

- `prepare` (blocking: a worker thread) reads the file with the same code as
  ``check-config`` (``config.load``, the TLS certificate, the DKIM keys) and builds what
  must be read from disk, or raises the same `ConfigError`; nothing running is touched.
- `keep_restart_only`: the settings that cannot change without a restart
  (`RESTART_ONLY`: the spool, the account given up to, the host's own accounts) keep
  their old values, with a warning naming each key that changed.
- `sync_listeners`: binds the listeners the new config adds and closes the ones it
  drops (their sessions go on to their end). A port that cannot be bound is logged and
  skipped, the rest of the config is kept; below 1024 after ``server.user`` gave up
  root it cannot be bound until a restart, and the warning says so.

What a reload does not do: touch a session in flight (each `server.Session` keeps the
settings it started with), or a message already accepted (its spool entry and its
delivery do not depend on the config it was accepted under; a delivery that starts
after the reload routes by the new one).

Not here: signals and the order of the swap (``app``), the answer file (``control``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .config import load
from .dkimsig import Signer, load_signer
from .errors import ConfigError
from .safeio import make_dirs
from .server import SMTPServer, listeners
from .settings import Config
from .tls import Certificates

log = logging.getLogger("monomail")

# "section.key": kept as the server started, until a restart.
RESTART_ONLY = ("server.spool_dir", "server.user", "local.system_accounts")


@dataclass(frozen=True)
class Fresh:
    """A new config and what was read from disk for it."""

    config: Config
    certificates: Certificates | None
    signer: Signer | None


def _value(config: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def keep_restart_only(old: Config, new: Config) -> tuple[Config, tuple[str, ...]]:
    """``new`` with `RESTART_ONLY` settings as ``old`` has them, and a warning per key changed."""
    changed = tuple(key for key in RESTART_ONLY if _value(old, key) != _value(new, key))
    kept = replace(new, server=replace(new.server, spool_dir=old.server.spool_dir, user=old.server.user),
                   local=replace(new.local, system_accounts=old.local.system_accounts))
    return kept, tuple(f"{key} changes only with a restart: keeping {_value(old, key)!r}" for key in changed)


def prepare(old: Config, path: Path) -> tuple[Fresh, tuple[str, ...]]:
    """Read and check the file (blocking); the new pieces and the warnings. Raises
    `ConfigError` as ``check-config`` would (and for a mail folder that cannot be made)."""
    new, warnings = keep_restart_only(old, load(path))
    certificates = Certificates(new.tls) if new.tls.enabled else None  # ConfigError (tls.cert)
    signer = load_signer(new)  # ConfigError (dkim."<domain>".key)
    try:
        make_dirs(new.local.mail_dir, 0o700)
    except OSError as exc:
        raise ConfigError("local.mail_dir", f"{new.local.mail_dir}: {exc.strerror or exc}") from None
    return Fresh(new, certificates, signer), (*new.warnings, *warnings)


def _why(exc: OSError, config: Config) -> str:
    if isinstance(exc, PermissionError) and os.geteuid() != 0 and config.server.user:
        return (f"{exc.strerror}: monomail gave up root (server.user = {config.server.user!r}), so a port "
                "below 1024 can be bound only by a restart")
    return exc.strerror or str(exc)


async def sync_listeners(server: SMTPServer, config: Config) -> tuple[str, ...]:
    """Listen where ``config`` says (bind the new, close the dropped); a warning per
    listener that could not be bound."""
    wanted = listeners(config)
    for kind, addr in list(server.listening):
        if (kind, addr) not in wanted:
            server.unlisten(kind, addr)
    warnings = []
    for kind, addr in wanted:
        if (kind, addr) in server.listening:
            continue
        try:
            await server.listen(kind, addr)
        except OSError as exc:
            warnings.append(f"cannot listen on {addr} ({kind}), the rest of the new config is used: "
                            f"{_why(exc, config)}")
    return tuple(warnings)
