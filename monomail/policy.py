"""SMTP-time policy: may this client send this MAIL FROM / RCPT TO?

Job: pure decisions the server asks for during a session, before any data is taken,
so that unwanted mail is refused at RCPT time (no backscatter). RFC 5321 §3.3, §4.5.3;
relay control as Postfix's ``reject_unauth_destination``.

- `is_trusted`: is the client address inside ``server.trusted_networks``?
- `owns`: may an authenticated user send as this address (RFC 6409 §4.1, as Postfix's
  ``reject_sender_login_mismatch``)? Their own local part at every local domain, the
  addresses in their ``senders`` (``@domain``: any address there), and every address of
  ours whose routing leads to their mailbox and nowhere else (their aliases, virtual
  addresses, ``user+tag``).
- `trusted_user` and `local_sender`: who a local user (a uid on this host, as the
  local socket's peer credentials or a drop file's owner say) may send as: root, the
  uid the server runs as and the names in ``local.trusted_users`` as anyone (sendmail's
  ``trusted-users``); everyone else as their own ``login@primary_domain`` or ``<>``.
- `check_recipient`: route the address; refuse unknown users (550 5.1.1), loops (550
  5.4.6), an alias's own ``:fail:`` / ``:defer:`` refusal with its code and text (550 /
  450), and any domain not ours unless the client is trusted (554 5.7.1). Source
  routes are ignored (the final mailbox decides), so ``<@us:x@other>`` is a relay
  attempt like any other. It routes with ``router.routes``, so a route that depends on
  the config alone is not computed again at delivery.

No I/O; the caller supplies the client's address.
"""

from __future__ import annotations

import ipaddress

from .envelope import Address
from .errors import ReplyError, RouteError
from .router import RELAY_DENIED, Destination, Mailbox, Tables, is_our_domain, resolve, routes
from .settings import Config


def is_trusted(peer_ip: str, config: Config) -> bool:
    try:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in config.server.trusted_networks)


def trusted_user(uid: int, name: str | None, config: Config, server_uid: int | None) -> bool:
    """May this local user set any envelope sender?"""
    return uid == 0 or uid == server_uid or (name is not None and name in config.local.trusted_users)


def local_address(name: str | None, config: Config) -> str | None:
    """A local user's own address, ``login@primary_domain`` (None without a login name)."""
    return f"{name}@{config.local.primary_domain}" if name else None


def local_sender(sender: str, name: str | None, trusted: bool, config: Config) -> bool:
    """May the local user ``name`` (``trusted``: see `trusted_user`) use ``sender`` ("" for <>)?"""
    if trusted or not sender:
        return True
    own = local_address(name, config)
    return own is not None and sender.lower() == own.lower()


def check_recipient(address: Address, config: Config, *, trusted: bool, sender: str | None = None,
                    tables: Tables | None = None) -> tuple[Destination, ...]:
    """The destinations for an accepted recipient, or `RouteError` with the refusal.

    ``sender`` (the MAIL FROM address, "" for <>) lets a list refuse a poster here, at
    RCPT time, instead of bouncing later."""
    if not is_our_domain(address.domain, config) and not trusted:
        raise RouteError(RELAY_DENIED, f"relay to {address} from untrusted client")
    return routes(address, config, tables, sender)  # kept for delivery when it depends on the config alone


def owns(login: str, address: str, config: Config, tables: Tables | None = None) -> bool:
    """May the user authenticated as ``login`` (``alice``, or ``alice@`` a local domain) use
    ``address`` as a sender?"""
    user, at, login_domain = login.lower().partition("@")
    if at and login_domain not in config.local.domains:
        user = login.lower()  # a login in a domain not ours: only its senders and itself
    local, _, domain = address.rpartition("@")
    domain = domain.lower()
    if not local:
        return False
    if f"{local.lower()}@{domain}" == login.lower() or (local.lower() == user and domain in config.local.domains):
        return True
    settings = config.users.get(user)
    if settings is not None:
        wanted = {f"{local.lower()}@{domain}", f"@{domain}"}
        if any(s.lower() in wanted for s in settings.senders):
            return True
    if not is_our_domain(domain, config):
        return False
    try:
        destinations = resolve(Address(local, domain), config, tables, None)
    except ReplyError:
        return False
    return bool(destinations) and all(isinstance(d, Mailbox) and d.user == user for d in destinations)
