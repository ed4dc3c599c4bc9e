"""The configuration as values: the frozen tree that ``config`` builds from monomail.toml.

Job: vocabulary. Every setting monomail has, as frozen dataclasses that any layer may
read (pure decisions included) without importing the TOML parser. Defaults, checks and
the meaning of each key are documented where the key is read, in ``config``.

This module imports nothing of ours.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MAILBOX_FORMATS = ("maildir", "mbox")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[Listen, ...]
    spool_dir: Path
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_received_headers: int
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    timeout: float  # idle: no byte from the client for this long closes the session
    shutdown_grace: float
    max_connections_per_ip: int  # per client address (IPv6: per /64); trusted networks exempt
    max_errors: int  # 4xx/5xx replies in one session before 421 and close
    command_timeout: float  # one whole command line (or AUTH response line)
    data_timeout: float  # the whole DATA phase, 354 to the end-of-data line
    user: str = ""  # as root: bind the ports, then drop to this account for good ("": no drop)


@dataclass(frozen=True, slots=True)
class LocalConfig:
    domains: frozenset[str]
    primary_domain: str
    mailbox_format: str
    mail_dir: Path
    recipient_delimiter: str
    lock_timeout: float
    allow_dot_forward: bool
    system_accounts: bool = False  # the passwd database's accounts are local users too
    min_uid: int = 1000  # the lowest uid of such an account (root is always one)
    mail_spool: Path = Path("/var/spool/mail")  # a system account's mbox: <mail_spool>/<name>
    trusted_users: frozenset[str] = frozenset()  # may set the envelope sender (sendmail -f)


@dataclass(frozen=True, slots=True)
class LMTPTarget:
    """Where LMTP delivery goes (RFC 2033): a UNIX socket, or host and port."""

    path: Path | None  # "unix:/run/dovecot/lmtp"
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else str(Listen(self.host, self.port))


@dataclass(frozen=True, slots=True)
class User:
    name: str
    mailbox_format: str
    path: Path
    home: Path  # $HOME for recipes: the Maildir folder, or <mail_dir>/.<user> for mbox users
    recipes: Path  # the user's procmail-style recipe file (default <home>/.procmailrc)
    senders: tuple[str, ...] = ()  # more addresses the user may send as ("@shop.test": the domain)
    lmtp: LMTPTarget | None = None  # deliver this user's mail by LMTP instead of into `path`


@dataclass(frozen=True, slots=True)
class Account:
    """One account of the passwd database that receives mail (``accounts.lookup``)."""

    name: str
    uid: int
    gid: int  # the primary group
    groups: tuple[int, ...]  # every group it is in (initgroups), the primary one included
    home: Path | None  # None: no home directory (deliveries go to the mailbox alone)
    shell: str
    mailbox: Path  # <local.mail_spool>/<name>

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """An alias that answers instead of delivering: ``":fail: 5.1.1 This user has left"``
    (``code`` 5yz, refused for good) or ``":defer: 4.2.1 Moving, try later"`` (4yz)."""

    code: int  # the SMTP reply code: 550 / 450 unless the alias names another
    status: str  # the RFC 3463 enhanced status code, of the same class as ``code``
    text: str  # printable ASCII, at most ``addrlist.MAX_TEXT`` characters

    @property
    def temporary(self) -> bool:
        return self.code < 500


@dataclass(frozen=True, slots=True)
class Discard:
    """``":blackhole:"``: mail for the alias is accepted and delivered nowhere."""


# What an alias or a virtual entry stands for: its targets (users, aliases, addresses),
# or, alone, a refusal or a discard.
AliasTargets = tuple[str, ...] | Refusal | Discard


@dataclass(frozen=True, slots=True)
class Forward:
    """``[forward] user = { to = [...], keep_copy = true }``: what ``.forward`` gives."""

    user: str
    to: tuple[str, ...]
    keep_copy: bool


@dataclass(frozen=True, slots=True)
class MailingList:
    name: str
    address: str  # local@domain, lower-case
    members: tuple[str, ...]  # inline members
    members_file: Path | None  # one address a line, re-read when it changes
    policy: str  # "open" | "members" | "announce"
    posters: tuple[str, ...]  # who may post to an "announce" list
    owner: tuple[str, ...]  # gets <name>-owner, <name>-request and <name>-bounces mail
    bounce_address: str  # envelope sender of list mail (member bounces come back here)
    list_id: str  # RFC 2919, e.g. "dev.example.test"

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def request_address(self) -> str:
        local, _, domain = self.address.rpartition("@")
        return f"{local}-request@{domain}"


@dataclass(frozen=True, slots=True)
class Masquerade:
    domains: tuple[str, ...]
    exceptions: frozenset[str]


@dataclass(frozen=True, slots=True)
class FiltersConfig:
    enabled: bool
    allow_pipes: frozenset[str]
    pipe_timeout: float


@dataclass(frozen=True, slots=True)
class QueueConfig:
    retry: tuple[float, ...]
    give_up_after: float
    warn_after: float | None


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[str, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    port: int
    tls: str
    smarthost: str
    smarthost_username: str
    smarthost_password: str
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    max_connections: int
    max_connections_per_domain: int
    connection_idle: float
    cut_through: float


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path | None  # the PEM chain (certbot's fullchain.pem); None: no TLS at all
    key: Path | None  # the PEM private key (certbot's privkey.pem); the cert file when unset

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    listen: tuple[Listen, ...]  # RFC 6409 submission: STARTTLS, then AUTH (port 587)
    listen_tls: tuple[Listen, ...]  # RFC 8314 implicit TLS, then AUTH (port 465)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    password_file: Path  # user:hash lines (`monomail passwd`)
    dovecot: Path | None  # Dovecot's auth-client socket, used instead of the file
    auth_failures: int  # failures per client address per `FAILURE_WINDOW` before 421


@dataclass(frozen=True, slots=True)
class DKIMDomain:
    """``[dkim."example.test"]``: the keys mail from this domain is signed with."""

    domain: str
    selector: str  # for the RSA key ("" when only an Ed25519 key is configured)
    key: Path | None  # PEM private key (RSA), written by `monomail dkim keygen`
    ed25519_selector: str = ""
    ed25519_key: Path | None = None  # a second signature, Ed25519 (RFC 8463)


@dataclass(frozen=True, slots=True)
class ChecksConfig:
    """``[checks]``: what is checked on mail from untrusted clients on the MX port."""

    spf: bool = True
    dkim: bool = True
    dmarc: str = "enforce"  # "enforce" | "monitor" | "off"
    arc_seal: bool = True  # seal forwards and list posts (RFC 8617)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    file: Path | None
    syslog: bool = False  # also to the local syslog, facility mail
    syslog_socket: Path = Path("/dev/log")
    format: str = "text"  # "text" | "json"


@dataclass(frozen=True, slots=True)
class LMTPConfig:
    """``[lmtp]``: local mail delivered by LMTP (Dovecot's lmtp service) instead of files."""

    target: LMTPTarget | None = None  # all local mail
    domains: Mapping[str, LMTPTarget] = field(default_factory=dict)  # per local or virtual domain


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint."""

    listen: Listen | None = None  # None: off


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    hostname: str
    server: ServerConfig
    local: LocalConfig
    users: Mapping[str, User]
    aliases: Mapping[str, AliasTargets]
    virtual: Mapping[str, Mapping[str, AliasTargets]]
    forward: Mapping[str, Forward]
    lists: Mapping[str, MailingList]
    list_addresses: Mapping[str, tuple[MailingList, str]]  # address → (list, "post" | "owner")
    masquerade: Masquerade
    filters: FiltersConfig
    queue: QueueConfig
    dns: DNSConfig
    remote: RemoteConfig
    log: LogConfig
    tls: TLSConfig = TLSConfig(None, None)
    submission: SubmissionConfig = SubmissionConfig((), ())
    auth: AuthConfig = AuthConfig(Path("passwords"), None, 5)
    dkim: Mapping[str, DKIMDomain] = field(default_factory=dict)
    checks: ChecksConfig = ChecksConfig()
    lmtp: LMTPConfig = LMTPConfig()
    metrics: MetricsConfig = MetricsConfig()
    warnings: tuple[str, ...] = field(default=(), compare=False)
