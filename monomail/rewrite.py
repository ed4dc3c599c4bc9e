"""Rewriting for mail that leaves the host: masquerading and forwarded senders.

Job: pure functions over addresses and header bytes.

- Masquerading (sendmail's MASQUERADE_AS / Postfix's ``masquerade_domains``): an
  address in a *subdomain* of a configured domain (``user@host.sub.example.test``)
  becomes ``user@example.test``; local parts listed in ``masquerade.exceptions``
  (``root``) never change. Applied to the envelope sender and to the addresses in the
  ``From:`` and ``Sender:`` fields of mail relayed out, never to local deliveries.
- Forwarded mail (`forward_sender`): the original envelope sender is kept where that is
  safe — the null sender, or an address in one of our own domains, which our host may
  send for. Any other sender is replaced by the forwarding user's own address (a plain
  rewrite rather than SRS): the target's SPF check then sees one of our addresses, and
  bounces come back to the user who forwarded, never to a forged third party. monomail
  chose this over SRS because SRS addresses must be verified on the way back, which
  makes every mistake in the secret's handling an open relay.
"""

from __future__ import annotations

import re

from .message import header_block
from .settings import Config, Masquerade

_FROM_SENDER = re.compile(rb"^(From|Sender):[^\n]*(?:\n[ \t][^\n]*)*\n", re.IGNORECASE | re.MULTILINE)
_ADDR = re.compile(rb"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+)@([A-Za-z0-9.\-]+)")


def masquerade_domain(domain: str, masq: Masquerade) -> str:
    d = domain.lower()
    for target in masq.domains:
        if d.endswith("." + target):
            return target
    return domain


def masquerade_address(address: str, masq: Masquerade) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not masq.domains or local.lower() in masq.exceptions:
        return address
    return f"{local}@{masquerade_domain(domain, masq)}"


def masquerade_headers(data: bytes, masq: Masquerade) -> bytes:
    """``data`` with the addresses of its From:/Sender: fields masqueraded."""
    if not masq.domains:
        return data
    head = header_block(data)
    body = data[len(head) :]

    def field(m: re.Match[bytes]) -> bytes:
        def addr(a: re.Match[bytes]) -> bytes:
            local, domain = a.group(1), a.group(2).decode("ascii")
            if local.decode("ascii", "replace").lower() in masq.exceptions:
                return a.group(0)
            return local + b"@" + masquerade_domain(domain, masq).encode("ascii")

        return _ADDR.sub(addr, m.group(0))

    return _FROM_SENDER.sub(field, head) + body


def forward_sender(sender: str, forwarder: str, config: Config) -> str:
    """The envelope sender for mail that ``forwarder`` forwards off the host."""
    domain = sender.rpartition("@")[2].lower()
    if not sender or domain in config.local.domains or domain in config.virtual:
        return sender
    return f"{forwarder}@{config.local.primary_domain}"
