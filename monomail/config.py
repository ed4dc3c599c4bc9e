"""monomail.toml, parsed once into a frozen tree.

Job: read the one configuration file with the stdlib ``tomllib``, check every key, and
return a `Config` of frozen dataclasses that the rest of monomail reads and never
changes. Every default lives in this module, in the calls that read each key. Relative
paths are resolved against the config file's folder.

Error handling: an unknown key, a wrong type or a bad value raises `ConfigError` naming
the dotted key path (``server.max_recipients: expected an integer ≥ 1, got "ten"``);
``monomail serve`` and ``monomail check-config`` print it on one line and exit 2.
Problems that do not stop start-up (an alias loop) are returned as `Config.warnings`.

Where the file is: `config_path` (``-c``, ``$MONOMAIL_CONFIG``, ``./monomail.toml``,
``/etc/monomail/monomail.toml``), for the commands other programs call.

Alias and virtual-table targets are users, aliases or addresses; an alias (or a
virtual entry) may instead hold one special target, as Exim's redirect router spells it,
that answers for the address at RCPT time instead of delivering it:

- ``":fail: 5.1.1 This user has left"``: refused for good, ``550 5.1.1 This user has
  left``. The status is optional (default ``5.1.1``, text ``User unknown``); a reply code
  may precede it (``":fail: 551 5.1.6 Moved to bob@example.net"``); a 5.x.x status only.
- ``":defer: 4.2.1 Mailbox moving, try tomorrow"``: refused for now, ``450 4.2.1 ...``
  (default ``4.2.1 Try again later``); a 4.x.x status only.
- ``":blackhole:"``: accepted and delivered nowhere.

sendmail's ``error:5.1.1:550 text`` and ``error:nouser text`` are read as ``:fail:`` (or
``:defer:`` for a 4.x.x status). The text must be printable ASCII, at most 200
characters. A special target must be the only target of its alias: ``olduser =
[":fail: ..."]``. An alias that names a refusing alias among its targets is refused as a
whole (a warning says so). The syntax is `addrlist`'s, shared with ``monomail import``.

Not here: the values themselves (``settings``, vocabulary any layer may import), and
what the keys mean at run time (``router``, ``server``, ``queue``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import configkeys as keys
from . import configtables as tables
from .configkeys import Table, parse_duration
from .errors import ConfigError
from .settings import (
    MAILBOX_FORMATS,
    AuthConfig,
    ChecksConfig,
    Config,
    DKIMDomain,
    DNSConfig,
    FiltersConfig,
    LMTPConfig,
    LocalConfig,
    LogConfig,
    MailingList,
    Masquerade,
    MetricsConfig,
    QueueConfig,
    RemoteConfig,
    ServerConfig,
    SubmissionConfig,
    TLSConfig,
    User,
)

# A user name becomes a path component under mail_dir, so it is held to a safe alphabet.
_USER_NAME = re.compile(r"[a-z0-9_][a-z0-9._\-]*\Z")


def _account_name(t: Table, name: str, value: str | None = None) -> str:
    """``server.user`` or one ``local.trusted_users`` entry: a Unix account name (its
    existence is checked when it is used: at start-up, or by each submission)."""
    value = t.string(name, "") if value is None else value
    if value and not keys.is_account_name(value):
        raise ConfigError(t.key(name), f"expected a Unix account name, got {value!r}")
    return value


def _server(t: Table, base: Path) -> ServerConfig:
    listen = tuple(keys.listen(v, t.key("listen")) for v in t.strings("listen", ["127.0.0.1:2525"]))
    if not listen:
        raise ConfigError(t.key("listen"), "expected at least one address")
    cfg = ServerConfig(
        listen=listen,
        spool_dir=t.path_("spool_dir", "var/spool", base),
        max_message_size=t.integer("max_message_size", 26214400, minimum=1024),
        max_recipients=t.integer("max_recipients", 100, minimum=1),
        max_connections=t.integer("max_connections", 100, minimum=1),
        max_received_headers=t.integer("max_received_headers", 50, minimum=1),
        trusted_networks=tuple(
            keys.network(v, t.key("trusted_networks"))
            for v in t.strings("trusted_networks", ["127.0.0.0/8", "::1/128"])
        ),
        timeout=t.duration("timeout", "5m"),
        shutdown_grace=t.duration("shutdown_grace", "10s"),
        max_connections_per_ip=t.integer("max_connections_per_ip", 10, minimum=1),
        max_errors=t.integer("max_errors", 10, minimum=1),
        command_timeout=t.duration("command_timeout", "5m"),
        data_timeout=t.duration("data_timeout", "10m"),
        user=_account_name(t, "user"),
    )
    t.finish()
    return cfg


def _local(t: Table, base: Path) -> LocalConfig:
    domains = [keys.domain(d, t.key("domains")) for d in t.strings("domains", ["localhost"])]
    if not domains:
        raise ConfigError(t.key("domains"), "expected at least one domain")
    delimiter = t.string("recipient_delimiter", "+")
    if any(c.isalnum() or c in "@.\"\\ " for c in delimiter):
        raise ConfigError(t.key("recipient_delimiter"), f"not usable as a delimiter: {delimiter!r}")
    cfg = LocalConfig(
        domains=frozenset(domains),
        primary_domain=domains[0],
        mailbox_format=t.string("mailbox_format", "maildir", MAILBOX_FORMATS),
        mail_dir=t.path_("mail_dir", "var/mail", base),
        recipient_delimiter=delimiter,
        lock_timeout=t.duration("lock_timeout", "10s"),
        allow_dot_forward=t.boolean("allow_dot_forward", False),
        system_accounts=t.boolean("system_accounts", False),
        min_uid=t.integer("min_uid", 1000, minimum=1),
        mail_spool=t.path_("mail_spool", "/var/spool/mail", base),
        trusted_users=frozenset(_account_name(t, "trusted_users", v) for v in t.strings("trusted_users", [])),
    )
    t.finish()
    return cfg


def _users(t: Table, local: LocalConfig, base: Path) -> dict[str, User]:
    users: dict[str, User] = {}
    for raw in list(t.data):
        name = raw.lower()
        key = t.key(raw)
        if not _USER_NAME.match(name) or name in (".", ".."):
            raise ConfigError(key, "a user name may hold only letters, digits, '.', '_' and '-'")
        if name in users:
            raise ConfigError(key, "defined twice (names are case-insensitive)")
        u = t.table(raw)
        fmt = u.string("mailbox_format", local.mailbox_format, MAILBOX_FORMATS)
        path = u.optional_path("path", base) or local.mail_dir / name
        home = u.optional_path("home", base) or (path if fmt == "maildir" else path.with_name(f".{name}"))
        recipes = u.optional_path("recipes", base) or home / ".procmailrc"
        senders = tuple(_sender(v, u.key("senders")) for v in u.strings("senders", []))
        lmtp = u.string("lmtp", "")
        u.finish()
        users[name] = User(name, fmt, path, home, recipes, senders,
                           keys.lmtp_target(lmtp, u.key("lmtp"), base) if lmtp else None)
    return users


def _sender(value: str, key: str) -> str:
    """One ``senders`` entry: ``local@domain`` (lower-case domain) or ``@domain``."""
    local, at, domain = value.strip().rpartition("@")
    if not at or (local and not re.fullmatch(r"[^\s@<>(),;:\\\"]+", local)):
        raise ConfigError(key, f"expected \"user@domain\" or \"@domain\", got {value!r}")
    return f"{local}@{keys.domain(domain, key)}"


def _masquerade(t: Table) -> Masquerade:
    domains = tuple(keys.domain(d, t.key("domains")) for d in t.strings("domains", []))
    m = Masquerade(domains, frozenset(e.lower() for e in t.strings("exceptions", [])))
    t.finish()
    return m


def _queue(t: Table) -> QueueConfig:
    retry = tuple(parse_duration(v, t.key("retry")) for v in t.get("retry", ["1m", "5m", "15m", "30m", "1h"]))
    if not retry or min(retry) <= 0:
        raise ConfigError(t.key("retry"), "expected a non-empty list of positive durations")
    warn = t.get("warn_after", "4h")
    cfg = QueueConfig(
        retry=retry,
        give_up_after=t.duration("give_up_after", "5d"),
        warn_after=None if warn in ("", False) else parse_duration(warn, t.key("warn_after")),
    )
    t.finish()
    return cfg


def _dns(t: Table) -> DNSConfig:
    servers = t.strings("nameservers", [])
    for ns in servers:
        host = ns[1:].partition("]")[0] if ns.startswith("[") else ns.rpartition(":")[0] if ns.count(":") == 1 else ns
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(t.key("nameservers"), f"expected an IP address with optional :port, got {ns!r}") from None
    cfg = DNSConfig(tuple(servers), t.duration("timeout", "5s"))
    t.finish()
    return cfg


def _remote(t: Table) -> RemoteConfig:
    smarthost = t.string("smarthost", "")
    if smarthost and not re.fullmatch(r"\[[0-9A-Fa-f:.]+\](:\d+)?|[A-Za-z0-9.\-]+(:\d+)?", smarthost):
        raise ConfigError(t.key("smarthost"), f"expected \"host:port\", got {smarthost!r}")
    cfg = RemoteConfig(
        port=t.integer("port", 25, minimum=1),
        tls=t.string("tls", "opportunistic", ("opportunistic", "required", "none")),
        smarthost=smarthost,
        smarthost_username=t.string("smarthost_username", ""),
        smarthost_password=t.string("smarthost_password", ""),
        connect_timeout=t.duration("connect_timeout", "30s"),
        command_timeout=t.duration("command_timeout", "5m"),
        data_timeout=t.duration("data_timeout", "10m"),
        max_connections=t.integer("max_connections", 50, minimum=1),
        max_connections_per_domain=t.integer("max_connections_per_domain", 10, minimum=1),
        connection_idle=t.duration("connection_idle", "5s"),
        cut_through=t.duration("cut_through", "30s"),
    )
    if cfg.port > 65535:
        raise ConfigError(t.key("port"), f"port out of range: {cfg.port}")
    t.finish()
    return cfg


def _tls(t: Table, base: Path) -> TLSConfig:
    cert, key = t.string("cert", ""), t.string("key", "")
    if key and not cert:
        raise ConfigError(t.key("cert"), "a key without a certificate: set cert too")
    t.finish()
    return TLSConfig((base / cert).resolve() if cert else None,
                     (base / (key or cert)).resolve() if cert else None)


def _submission(t: Table, tls: TLSConfig) -> SubmissionConfig:
    cfg = SubmissionConfig(
        listen=tuple(keys.listen(v, t.key("listen")) for v in t.strings("listen", [])),
        listen_tls=tuple(keys.listen(v, t.key("listen_tls")) for v in t.strings("listen_tls", [])),
    )
    for name, value in (("listen", cfg.listen), ("listen_tls", cfg.listen_tls)):
        if value and not tls.enabled:
            raise ConfigError(t.key(name), "submission needs TLS: set tls.cert and tls.key")
    t.finish()
    return cfg


def _auth(t: Table, base: Path) -> AuthConfig:
    dovecot = t.string("dovecot", "")
    socket_path = dovecot.removeprefix("dovecot:")
    if dovecot and not socket_path:
        raise ConfigError(t.key("dovecot"), "expected \"dovecot:/path/to/auth-client\"")
    cfg = AuthConfig(
        password_file=t.path_("password_file", "passwords", base),
        dovecot=(base / socket_path).resolve() if socket_path else None,
        auth_failures=t.integer("auth_failures", 5, minimum=1),
    )
    t.finish()
    return cfg


def _dkim(t: Table, base: Path) -> dict[str, DKIMDomain]:
    out: dict[str, DKIMDomain] = {}
    for raw in list(t.data):
        domain = keys.domain(raw, t.key(raw))
        d = t.table(raw)
        selector, ed_selector = d.string("selector", ""), d.string("ed25519_selector", "")
        key, ed_key = d.optional_path("key", base), d.optional_path("ed25519_key", base)
        for name, sel, path in (("selector", selector, key), ("ed25519_selector", ed_selector, ed_key)):
            if bool(sel) != (path is not None):
                other = "key" if name == "selector" else "ed25519_key"
                raise ConfigError(d.key(name), f"{name} and {other} go together")
            if sel and not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", sel):
                raise ConfigError(d.key(name), f"not a DKIM selector: {sel!r}")
        if key is None and ed_key is None:
            raise ConfigError(d.key("key"), "expected a key (or ed25519_key) for the domain")
        d.finish()
        out[domain] = DKIMDomain(domain, selector, key, ed_selector, ed_key)
    return out


def _checks(t: Table) -> ChecksConfig:
    cfg = ChecksConfig(
        spf=t.boolean("spf", True),
        dkim=t.boolean("dkim", True),
        dmarc=t.string("dmarc", "enforce", ("enforce", "monitor", "off")),
        arc_seal=t.boolean("arc_seal", True),
    )
    t.finish()
    return cfg


def _log(t: Table, base: Path) -> LogConfig:
    level = t.string("level", "info", ("debug", "info", "warning", "error"))
    file = t.string("file", "")
    cfg = LogConfig(level, (base / file).resolve() if file else None, syslog=t.boolean("syslog", False),
                    syslog_socket=t.path_("syslog_socket", "/dev/log", base),
                    format=t.string("format", "text", ("text", "json")))
    t.finish()
    return cfg


def _lmtp(t: Table, local: LocalConfig, virtual: Mapping[str, object], base: Path) -> LMTPConfig:
    """``[lmtp]``: ``target`` for all local mail, ``domains`` per local or virtual domain
    (a table of its own, not a key in ``[virtual."domain"]``, where it would shadow the
    address ``lmtp@domain``)."""
    target = t.string("target", "")
    dt = t.table("domains")
    domains = {}
    for raw in list(dt.data):
        domain = keys.domain(raw, dt.key(raw))
        if domain not in local.domains and domain not in virtual:
            raise ConfigError(dt.key(raw), "not one of local.domains or a virtual domain")
        domains[domain] = keys.lmtp_target(dt.string(raw, ""), dt.key(raw), base)
    dt.finish()
    t.finish()
    return LMTPConfig(keys.lmtp_target(target, t.key("target"), base) if target else None,
                      MappingProxyType(domains))


def _metrics(t: Table) -> MetricsConfig:
    listen = t.string("listen", "")
    t.finish()
    return MetricsConfig(keys.listen(listen, t.key("listen")) if listen else None)


def parse(data: dict[str, Any], path: Path) -> Config:
    """Build a `Config` from an already-decoded TOML table; ``path`` anchors relative paths."""
    base = path.parent
    top = Table(data, "")
    hostname = top.string("hostname", socket.gethostname())
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-]*", hostname):
        raise ConfigError("hostname", f"expected a host name, got {hostname!r}")
    server = _server(top.table("server"), base)
    local = _local(top.table("local"), base)
    if server.user not in ("", "root") and local.system_accounts:
        raise ConfigError("server.user", "not with local.system_accounts: delivering as each account needs "
                                         "root (leave server.user empty)")
    users = _users(top.table("users"), local, base)
    aliases, warnings = tables.aliases(top.table("aliases"), users, local)
    names = tables.target_names(users, aliases, local)
    virtual = tables.virtual(top.table("virtual"), local, names)
    for name, targets in aliases.items():
        warnings += tables.refusing(f"aliases.{name}", targets, aliases)
    for domain, entries in virtual.items():
        for key, targets in entries.items():
            warnings += tables.refusing(f'virtual."{domain}".{key}', targets, aliases)
    forward = tables.forwards(top.table("forward"), users, names)
    lists = tables.lists(top.table("lists"), local, virtual, names, base)
    list_addresses: dict[str, tuple[MailingList, str]] = {}
    for lst in lists.values():
        local_part, _, domain = lst.address.rpartition("@")
        for address, role in ((lst.address, "post"), (lst.bounce_address, "owner"),
                              (f"{local_part}-owner@{domain}", "owner"), (lst.request_address, "owner")):
            list_addresses.setdefault(address, (lst, role))
    masquerade = _masquerade(top.table("masquerade"))
    ft = top.table("filters")
    filters = FiltersConfig(ft.boolean("enabled", False), frozenset(n.lower() for n in ft.strings("allow_pipes", [])),
                            ft.duration("pipe_timeout", "30s"))
    for name in filters.allow_pipes:
        if name not in users:
            raise ConfigError(ft.key("allow_pipes"), f"no such user: {name!r}")
    ft.finish()
    declared = set(users) | set(aliases)
    if local.system_accounts and "root" not in declared:
        warnings.append(f"aliases.root: not defined; mail to root goes to {local.mail_spool / 'root'}, "
                        "which nobody reads: alias root to a person")
    if "postmaster" not in declared:
        warnings.append("aliases.postmaster: not defined; postmaster@ goes to the first user" if users else
                        "aliases.postmaster: not defined; postmaster@ goes to root" if local.system_accounts else
                        "users: none defined; postmaster@ cannot be delivered")
    queue = _queue(top.table("queue"))
    dns = _dns(top.table("dns"))
    remote = _remote(top.table("remote"))
    log = _log(top.table("log"), base)
    tls = _tls(top.table("tls"), base)
    submission = _submission(top.table("submission"), tls)
    auth = _auth(top.table("auth"), base)
    dkim = _dkim(top.table("dkim"), base)
    checks = _checks(top.table("checks"))
    lmtp = _lmtp(top.table("lmtp"), local, virtual, base)
    metrics = _metrics(top.table("metrics"))
    top.finish()
    return Config(
        path=path,
        hostname=hostname,
        server=server,
        local=local,
        users=MappingProxyType(users),
        aliases=MappingProxyType(aliases),
        virtual=MappingProxyType({d: MappingProxyType(t) for d, t in virtual.items()}),
        forward=MappingProxyType(forward),
        lists=MappingProxyType(lists),
        list_addresses=MappingProxyType(list_addresses),
        masquerade=masquerade,
        filters=filters,
        queue=queue,
        dns=dns,
        remote=remote,
        log=log,
        tls=tls,
        submission=submission,
        auth=auth,
        dkim=MappingProxyType(dkim),
        checks=checks,
        lmtp=lmtp,
        metrics=metrics,
        warnings=tuple(warnings),
    )


def load(path: str | Path) -> Config:
    """Read and check ``path``. Raises `ConfigError` (with key ``""`` for file-level errors)."""
    p = Path(path).resolve()
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", f"{p}: no such file") from None
    except OSError as exc:
        raise ConfigError("", f"{p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p}: not valid TOML: {exc}") from None
    return parse(data, p)


DEFAULT_CONFIGS = (Path("monomail.toml"), Path("/etc/monomail/monomail.toml"))


def config_path(explicit: str | None = None) -> Path:
    """The config file: ``explicit``, ``$MONOMAIL_CONFIG``, ./monomail.toml, /etc/monomail/."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("MONOMAIL_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_CONFIGS:
        if candidate.is_file():
            return candidate
    raise ConfigError("", "no configuration found: set MONOMAIL_CONFIG, or create ./monomail.toml "
                          "or /etc/monomail/monomail.toml")


def load_config(explicit: str | None = None) -> Config:
    """`load` the file `config_path` finds."""
    return load(config_path(explicit))
