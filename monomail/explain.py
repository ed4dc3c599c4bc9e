"""``monomail route``: show where addresses go, without sending anything.

Job: what ``exim -bt`` and ``sendmail -bv`` do. For each address, print the tree of
expansions the router made (list, virtual entry, alias, forward rule, user, system
account with its uid, mailbox and home), the config
key each step came from, and each final destination: a local mailbox with its path and
format (or, delivered by LMTP, the target, the RCPT TO address and the key that chose
LMTP), or a remote domain with the hosts it would be sent to (an MX lookup with the
configured resolver, or the smarthost) and the envelope sender that copy would carry
(list bounce address, forwarding rewrite, masquerading). Errors are shown in place (an
alias's own ``:fail:`` or ``:defer:`` reply among them), and the exit code is 2 when
any address fails to route; a ``:blackhole:`` alias is shown as discarded.

Not here: the routing itself (``router``); sending (``remote``) — only the DNS lookups
(``resolver``) are used, to show MX hosts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .envelope import Address, parse_path
from .errors import AddressError, DestinationError
from .resolver import Resolver
from .rewrite import forward_sender, masquerade_address
from .router import Destination, Mailbox, Node, Remote, Tables, expand
from .settings import Config


def _sender_for(dest: Destination, sender: str | None, config: Config) -> str | None:
    if sender is None:
        return None
    out = sender if dest.via.sender is None else dest.via.sender
    if isinstance(dest, Remote):
        if dest.via.forwarder:
            out = forward_sender(out, dest.via.forwarder, config)
        out = masquerade_address(out, config.masquerade) if out else out
    return out


async def _hosts(domain: str, config: Config, resolver: Resolver, cache: dict[str, str]) -> str:
    if config.remote.smarthost:
        return f"via smarthost {config.remote.smarthost}"
    if domain not in cache:
        try:
            hosts = await resolver.mx_hosts(domain)
            shown = []
            for host in hosts:
                try:
                    addrs = await resolver.addresses(host)
                except DestinationError as exc:
                    addrs = [f"lookup failed: {exc.reply}"]
                shown.append(f"{host} [{', '.join(addrs) or 'no address'}]")
            cache[domain] = f"MX {'; '.join(shown)}, smtp port {config.remote.port}, tls {config.remote.tls}"
        except DestinationError as exc:
            cache[domain] = f"cannot send: {exc.reply} ({exc})"
    return cache[domain]


async def _render(node: Node, depth: int, out: list[str], config: Config, sender: str | None,
                  resolver: Resolver, cache: dict[str, str]) -> bool:
    pad = "  " * depth
    key = f" ({node.key})" if node.key else ""
    ok = node.error is None
    if node.error:
        out.append(f"{pad}{node.address}: {node.rule}{key}: FAILS {node.error.reply} ({node.error.detail})")
    elif isinstance(node.dest, Mailbox) and node.dest.lmtp is not None:
        lmtp = node.dest.lmtp
        out.append(f"{pad}{node.address}: {node.rule}{key} -> lmtp {lmtp.target} as <{lmtp.recipient}> "
                   f"({lmtp.rule})")
    elif isinstance(node.dest, Mailbox):
        box = node.dest
        out.append(f"{pad}{node.address}: {node.rule}{key} -> {box.format} {box.path}")
        if box.account is not None:
            acct = box.account
            home = acct.home if acct.home is not None else "none (the mailbox only)"
            out.append(f"{pad}  system account {acct.name}: uid {acct.uid}, gid {acct.gid}, mailbox {acct.mailbox}, "
                       f"home {home}" + (" (root: recipes not run; alias root to a person)" if acct.is_root else ""))
    elif isinstance(node.dest, Remote):
        domain = node.dest.domain
        out.append(f"{pad}{node.address}: remote {domain} -> {await _hosts(domain, config, resolver, cache)}")
    else:
        out.append(f"{pad}{node.address}: {node.rule}{key}")
    if node.dest is not None:
        shown = _sender_for(node.dest, sender, config)
        if shown is not None and shown != sender:
            out.append(f"{pad}  envelope sender <{sender}> -> <{shown}>")
        if node.dest.via.headers:
            out.append(f"{pad}  adds {', '.join(name for name, _ in node.dest.via.headers)}")
    for child in node.children:
        child_ok = await _render(child, depth + 1, out, config, sender, resolver, cache)
        ok = ok and (child_ok or node.members)
    return ok


async def explain(addresses: Sequence[str], config: Config, tables: Tables, sender: str | None) -> tuple[str, bool]:
    """The report for ``addresses`` and whether all of them route."""
    resolver = Resolver(config.dns.nameservers, config.dns.timeout)
    out: list[str] = []
    all_ok = True
    cache: dict[str, str] = {}
    if sender is not None and config.masquerade.domains:
        masked = masquerade_address(sender, config.masquerade)
        if masked != sender:
            out.append(f"sender <{sender}>: masqueraded to <{masked}> on mail leaving the host "
                       f"(masquerade.domains; From:/Sender: headers likewise)")
    for text in addresses:
        try:
            address, _ = parse_path(text if text.startswith("<") else f"<{text}>", smtputf8=True)
        except AddressError as exc:
            out.append(f"{text}: FAILS {exc.reply} ({exc.detail})")
            all_ok = False
            continue
        if address is None:
            out.append(f"{text}: FAILS the null address is not a recipient")
            all_ok = False
            continue
        if not address.domain:
            address = Address(address.local, config.local.primary_domain, address.quoted)
        tree = expand(address, config, tables, sender)
        all_ok = await _render(tree, 0, out, config, sender, resolver, cache) and all_ok
    return "\n".join(out) + "\n", all_ok


def run(addresses: Sequence[str], config: Config, tables: Tables, sender: str | None) -> tuple[str, bool]:
    return asyncio.run(explain(addresses, config, tables, sender))
