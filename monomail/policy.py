"""SMTP-time policy: may this client send this MAIL FROM / RCPT TO?

Job: pure decisions the server asks for during a session, before any data is taken,
so that unwanted mail is refused at RCPT time (no backscatter). RFC 5321 §3.3, §4.5.3;
relay control as Postfix's ``reject_unauth_destination``.

- `is_trusted`: is the client address inside ``server.trusted_networks``?
- `check_recipient`: route the address; refuse unknown users (550 5.1.1), loops (550
  5.4.6), an alias's own ``:fail:`` / ``:defer:`` refusal with its code and text (550 /
  450), and any domain not ours unless the client is trusted (554 5.7.1). Source
  routes are ignored (the final mailbox decides), so ``<@us:x@other>`` is a relay
  attempt like any other.

No I/O; the caller supplies the client's address.
"""

from __future__ import annotations

import ipaddress

from .envelope import Address
from .errors import RouteError
from .router import RELAY_DENIED, Destination, Tables, is_our_domain, resolve
from .settings import Config


def is_trusted(peer_ip: str, config: Config) -> bool:
    try:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in config.server.trusted_networks)


def check_recipient(address: Address, config: Config, *, trusted: bool, sender: str | None = None,
                    tables: Tables | None = None) -> tuple[Destination, ...]:
    """The destinations for an accepted recipient, or `RouteError` with the refusal.

    ``sender`` (the MAIL FROM address, "" for <>) lets a list refuse a poster here, at
    RCPT time, instead of bouncing later."""
    if not is_our_domain(address.domain, config) and not trusted:
        raise RouteError(RELAY_DENIED, f"relay to {address} from untrusted client")
    return resolve(address, config, tables, sender)
