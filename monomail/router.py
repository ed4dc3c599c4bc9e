"""Routing: which destinations one recipient address stands for.

Job: a pure function of an `Address` and the `Config`: expand aliases (nested, with loop
detection), strip a ``recipient_delimiter`` tag, match users case-insensitively, and
return the final destinations: a local `Mailbox`, or a `Remote` address for mail that
leaves the host. No I/O, no clock.

Lookup order for a local part, as Postfix's local(8) does it: the full local part as an
alias, then as a user; then, if it carries a tag (``alice+news``), the part before the
delimiter as an alias, then as a user. An alias target that names the alias itself and
is also a user (``alice = ["alice", "x@remote"]``) delivers to that user, as in
/etc/aliases; any other cycle is an alias loop (550 5.4.6, RFC 3463 "routing loop").

Security stance (DESIGN invariants 3 and 4): a local part is only ever a key into the
configured tables; paths come from config. A local part that carries another address
(``%``, ``!``, ``@`` inside quotes) is refused as a relay attempt, whoever asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .envelope import Address
from .errors import Reply, RouteError

MAX_DEPTH = 20

UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
ALIAS_LOOP = Reply(550, "5.4.6", "Alias loop detected")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """Deliver into a local mailbox file or folder."""

    user: str
    path: Path
    format: str  # "maildir" | "mbox"
    address: str  # the address that led here, for Delivered-To

    @property
    def key(self) -> str:
        return f"mailbox:{self.path}"


@dataclass(frozen=True, slots=True)
class Remote:
    """Hand to another host (remote delivery)."""

    address: str
    domain: str

    @property
    def key(self) -> str:
        return f"remote:{self.address.lower()}"


Destination = Mailbox | Remote


def is_local_domain(domain: str, config: Config) -> bool:
    return domain == "" or domain in config.local.domains


def _smuggles(local: str) -> bool:
    return any(c in local for c in "%!@")


def resolve(address: Address, config: Config) -> tuple[Destination, ...]:
    """All final destinations for ``address``, duplicates removed, in order.

    Raises `RouteError` with the reply for an unknown user, a loop or a relay attempt.
    """
    if not is_local_domain(address.domain, config):
        return (Remote(str(address), address.domain),)
    out: dict[str, Destination] = {}
    _expand_local(address, config, (), out, 0)
    return tuple(out.values())


def _expand_local(
    address: Address, config: Config, chain: tuple[str, ...], out: dict[str, Destination], depth: int
) -> None:
    if depth > MAX_DEPTH:
        raise RouteError(ALIAS_LOOP, f"alias nesting deeper than {MAX_DEPTH} at {address}")
    local = address.local
    if _smuggles(local):
        raise RouteError(RELAY_DENIED, f"local part carries another address: {address}")
    shown = str(address) if address.domain else f"{address}@{config.local.primary_domain}"
    for name in _candidates(local.lower(), config.local.recipient_delimiter):
        if name in config.aliases:
            if name in chain:
                if name in config.users:
                    _add(out, _mailbox(name, shown, config))
                    return
                raise RouteError(ALIAS_LOOP, f"alias loop: {' -> '.join((*chain, name))}")
            for target in config.aliases[name]:
                _expand_target(target, config, (*chain, name), out, depth + 1)
            return
        if name in config.users:
            _add(out, _mailbox(name, shown, config))
            return
    raise RouteError(UNKNOWN_USER, f"unknown local user {address}")


def _expand_target(
    target: str, config: Config, chain: tuple[str, ...], out: dict[str, Destination], depth: int
) -> None:
    if "@" in target:
        addr = Address.from_str(target)
        if not is_local_domain(addr.domain, config):
            _add(out, Remote(str(addr), addr.domain))
            return
    else:
        addr = Address(target, "")
    if chain and addr.local.lower() == chain[-1] and addr.local.lower() in config.users:
        # alice = ["alice", ...]: deliver to the user of that name, not back into the alias.
        _add(out, _mailbox(addr.local.lower(), str(addr) if addr.domain else addr.local, config))
        return
    _expand_local(addr, config, chain, out, depth)


def _candidates(local: str, delimiters: str) -> list[str]:
    names = [local]
    if delimiters:
        cut = min((i for i in (local.find(d) for d in delimiters) if i > 0), default=-1)
        if cut > 0:
            names.append(local[:cut])
    return names


def _mailbox(name: str, address: str, config: Config) -> Mailbox:
    user = config.users[name]
    if "@" not in address:
        address = f"{address}@{config.local.primary_domain}"
    return Mailbox(user.name, user.path, user.mailbox_format, address)


def _add(out: dict[str, Destination], dest: Destination) -> None:
    out.setdefault(dest.key, dest)
