"""Routing: which destinations one recipient address stands for, and why.

Job: a pure function of an `Address` and the `Config` (plus a `Tables` lookup for the
things that live outside the config: list members files, users' ``.forward`` files and,
with ``local.system_accounts``, the host's accounts). It
builds the tree of expansions — list, virtual table entry, alias, forward rule, user —
each node naming the config key it came from (`expand`, what ``monomail route``
prints), and flattens it into the final destinations (`resolve`): a local `Mailbox`,
or a `Remote` address for mail that leaves the host. No other I/O, no clock.

Lookup order for ``local@domain``:

1. a list address (``[lists.X] address``) or one of its ``-owner``, ``-request``,
   ``-bounces`` addresses (→ the list's ``owner``);
2. in a virtual domain: the ``[virtual."domain"]`` entry for the local part, then for
   the part before a ``recipient_delimiter`` tag, then the catch-all ``"*"``;
   ``postmaster`` falls back to the local postmaster (RFC 5321 §4.5.1);
3. in a local domain, as Postfix's local(8): the local part as an alias, then as a
   user, then (``local.system_accounts``) as an account of the host (`Tables.account`:
   a TOML user of the same name wins); then the same for the part before the tag. A
   user with a ``[forward]`` rule (or, when ``local.allow_dot_forward`` is on, a
   ``.forward`` file) is forwarded; ``keep_copy`` keeps a copy in the mailbox. An
   account's ``~/.forward`` is always honoured (read safely by ``tables``); its mailbox
   is the mbox ``<local.mail_spool>/<name>`` and the `Mailbox` carries the account, so
   delivery knows whose rights to use. ``postmaster`` with no alias or user of that
   name goes to the first user;
4. any other domain: `Remote`.

LMTP (RFC 2033, ``[lmtp]``, ``users.<name>.lmtp``): a user's or account's mailbox is
handed to a mail store over LMTP instead of written here when one of these names a
target, the first that does: the user's own ``lmtp``, then ``lmtp.domains`` for the
domain of the recipient address being routed (as the client gave it, before aliases and
virtual entries: ``info@shop.test`` → ``alice`` goes by ``lmtp.domains."shop.test"``),
then ``lmtp.target``. The `Mailbox` then carries an `Lmtp`: the target, the address
given to RCPT TO (always ``<name>@<local.primary_domain>``, one address per mailbox,
so two addresses of one user in one message are one copy) and the key that chose it;
its key is ``lmtp:<target>:<address>``.

An alias target that names the alias itself and is also a user (``alice = ["alice",
"x@remote"]``) delivers to that user, as in /etc/aliases; a forward to oneself
likewise. Any other cycle is a loop (550 5.4.6). A list's members inherit the list's
envelope sender (its bounce address) and List-* headers (RFC 2369/2919); a forward's
remote targets are marked so delivery can rewrite an unsafe envelope sender.

An alias or virtual entry may answer instead of delivering (``config`` reads the
spelling): a `Refusal` (``:fail:`` / ``:defer:``) fails the address with its own reply,
``550 5.1.1 This user has left`` or a 4xx, and so does every address whose expansion
reaches it outside a list; a `Discard` (``:blackhole:``) is a node with no destination,
so the address is accepted and delivered nowhere.

Routing once per recipient (`routes`): `resolve` with a memory. A route whose expansion
asked the `Tables` nothing is a function of the address's local part and domain (the only
parts of an address the router reads) and the config alone, so it is kept, keyed by the
config object itself (a frozen tree; a reload makes a new one): computed at RCPT time
(``policy.check_recipient``), used again at delivery (``deliver``) and for the next
message to that address. A route that asked the tables anything (a list's members, a
``.forward``, the host's accounts: files and passwd may change) is routed afresh every
time, and a refusal is never kept (a list's poster check, the only part that depends on
the sender, is reached through a table lookup). So `routes` always answers what
`resolve` answers now; the memo only saves the work. Bounded (`MEMO_ROUTES` addresses per
config, the memos of `MEMO_CONFIGS` configs); safe from any thread (a race costs one
routing more, never a wrong answer).

Security stance (DESIGN invariants 3 and 4): a local part is only ever a key into the
configured tables; paths come from config. A local part that carries another address
(``%``, ``!``, ``@`` inside quotes) is refused as a relay attempt, whoever asks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from .envelope import Address
from .errors import Reply, RouteError
from .settings import Account, Config, Discard, LMTPTarget, MailingList, Refusal, User

MAX_DEPTH = 20
MEMO_ROUTES = 4096  # addresses whose routes `routes` keeps per config
MEMO_CONFIGS = 4  # configs whose routes are kept (a reload makes a new config)

UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
ALIAS_LOOP = Reply(550, "5.4.6", "Alias loop detected")
NOT_A_POSTER = Reply(550, "5.7.1", "You are not allowed to post to this list")


@dataclass(frozen=True, slots=True)
class Via:
    """What the expansion path adds to a destination."""

    sender: str | None = None  # envelope sender to use instead of the original (list bounces)
    forwarder: str = ""  # the user whose forward rule led here (sender rewriting)
    list_id: str = ""  # the list this copy goes out for (loop guard)
    headers: tuple[tuple[str, str], ...] = ()  # header fields to add (List-*)


@dataclass(frozen=True, slots=True)
class Lmtp:
    """A mailbox that lives in a mail store reached by LMTP (Dovecot's ``lmtp``)."""

    target: LMTPTarget
    recipient: str  # the address given to RCPT TO: <name>@<local.primary_domain>
    rule: str  # the config key that chose LMTP: "users.alice.lmtp", "lmtp.domains.x", "lmtp.target"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """Deliver into a local mailbox file or folder (or, with ``lmtp``, to the user's mail store)."""

    user: str
    path: Path
    format: str  # "maildir" | "mbox"
    address: str  # the address that led here, for Delivered-To
    via: Via = Via()
    account: Account | None = None  # a system account's spool mbox: written with its ownership
    lmtp: Lmtp | None = None  # set: delivered by LMTP, ``path`` and ``format`` unused

    @property
    def key(self) -> str:
        if self.lmtp is not None:
            return f"lmtp:{self.lmtp.target}:{self.lmtp.recipient.lower()}"
        return f"mailbox:{self.path}"


@dataclass(frozen=True, slots=True)
class Remote:
    """Hand to another host (remote delivery)."""

    address: str
    domain: str
    via: Via = Via()

    @property
    def key(self) -> str:
        return f"remote:{self.address.lower()}"


@dataclass(frozen=True, slots=True)
class ListPost:
    """A post to a mailing list: becomes a new message from the list's bounce address to
    its members (so member failures bounce to the list, not to the poster)."""

    name: str
    address: str
    members: tuple[str, ...]
    via: Via  # sender = the bounce address, headers = List-*, list_id = the loop guard

    @property
    def key(self) -> str:
        return f"list:{self.name}"


Destination = Mailbox | Remote | ListPost


class Tables(Protocol):
    """Lookups that live in files; ``tables.FileTables`` reads them, re-reading on change."""

    def list_members(self, lst: MailingList) -> tuple[str, ...]: ...

    def dot_forward(self, user: User | Account) -> tuple[tuple[str, ...], bool] | None: ...

    def account(self, name: str) -> Account | None: ...


class ConfigTables:
    """Inline config only: no members files, no ``.forward`` files, no system accounts."""

    def list_members(self, lst: MailingList) -> tuple[str, ...]:
        return lst.members

    def dot_forward(self, user: User | Account) -> tuple[tuple[str, ...], bool] | None:
        return None

    def account(self, name: str) -> Account | None:
        return None


@dataclass
class Node:
    """One step of an expansion, for ``monomail route``."""

    address: str
    rule: str  # what matched: "alias team", "user alice", "list dev", ...
    key: str = ""  # the config key it came from
    children: list[Node] = field(default_factory=list)
    dest: Destination | None = None
    error: RouteError | None = None
    members: bool = False  # a list's member expansions hang below this node

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


def is_our_domain(domain: str, config: Config) -> bool:
    return domain == "" or domain in config.local.domains or domain in config.virtual


def resolve(address: Address, config: Config, tables: Tables | None = None,
            sender: str | None = None) -> tuple[Destination, ...]:
    """All final destinations for ``address``, duplicates removed, in order.

    Raises `RouteError` with the reply for an unknown user, a loop, a relay attempt or
    a poster the list refuses (checked when ``sender`` is given). A failing member of a
    list does not fail the list.
    """
    out: dict[str, Destination] = {}
    _collect(expand(address, config, tables, sender), out, False)
    return tuple(out.values())


_Memo = dict[tuple[str, str], tuple[Destination, ...]]
_memos: dict[int, tuple[Config, _Memo]] = {}  # id(config) -> (that config, kept alive so its id is not reused)


class _Asked:
    """Tables that note whether they were asked anything (then the route is not kept)."""

    __slots__ = ("inner", "asked")

    def __init__(self, inner: Tables) -> None:
        self.inner = inner
        self.asked = False

    def list_members(self, lst: MailingList) -> tuple[str, ...]:
        self.asked = True
        return self.inner.list_members(lst)

    def dot_forward(self, user: User | Account) -> tuple[tuple[str, ...], bool] | None:
        self.asked = True
        return self.inner.dot_forward(user)

    def account(self, name: str) -> Account | None:
        self.asked = True
        return self.inner.account(name)


def _memo(config: Config) -> _Memo:
    held = _memos.get(id(config))
    if held is not None and held[0] is config:
        return held[1]
    while len(_memos) >= MEMO_CONFIGS:
        _memos.pop(next(iter(_memos), 0), None)
    memo: _Memo = {}
    _memos[id(config)] = (config, memo)
    return memo


def routes(address: Address, config: Config, tables: Tables | None = None,
           sender: str | None = None) -> tuple[Destination, ...]:
    """`resolve`, from the memo when the route depends on the address and config alone
    (see the module's docstring). Raises `RouteError` as `resolve` does."""
    memo = _memo(config)
    key = (address.local, address.domain)
    found = memo.get(key)
    if found is not None:
        return found
    asked = _Asked(tables or ConfigTables())
    dests = resolve(address, config, asked, sender)
    if not asked.asked:
        if len(memo) >= MEMO_ROUTES:
            memo.clear()
        memo[key] = dests
    return dests


def _collect(node: Node, out: dict[str, Destination], under_list: bool) -> None:
    if node.error:
        if under_list:  # one bad member does not fail the whole list
            return
        raise node.error
    if node.dest is not None:
        out.setdefault(node.dest.key, node.dest)
    if node.members:
        return  # the members are the recipients of the list's own message (ListPost)
    for child in node.children:
        _collect(child, out, under_list)


def expand(address: Address, config: Config, tables: Tables | None = None,
           sender: str | None = None) -> Node:
    """The expansion tree of ``address`` (errors recorded in nodes, never raised)."""
    r = _Router(config, tables or ConfigTables(), sender, address.domain or config.local.primary_domain)
    return r.address(address, Via(), (), 0)


def lmtp_for(name: str, user: User | None, origin: str, config: Config) -> Lmtp | None:
    """The LMTP delivery of ``name``'s mailbox for mail to an address in ``origin``, if any:
    the user's own ``lmtp``, then ``lmtp.domains[origin]``, then ``lmtp.target``."""
    recipient = f"{name}@{config.local.primary_domain}"
    if user is not None and user.lmtp is not None:
        return Lmtp(user.lmtp, recipient, f"users.{name}.lmtp")
    by_domain = config.lmtp.domains.get(origin)
    if by_domain is not None:
        return Lmtp(by_domain, recipient, f'lmtp.domains."{origin}"')
    if config.lmtp.target is not None:
        return Lmtp(config.lmtp.target, recipient, "lmtp.target")
    return None


class _Router:
    def __init__(self, config: Config, tables: Tables, sender: str | None, origin: str) -> None:
        self.c = config
        self.t = tables
        self.origin = origin.lower()  # the domain of the address being routed (for lmtp.domains)
        self.sender = sender.lower() if sender is not None else None
        self.accounts: dict[str, Account | None] = {}  # one passwd lookup per name per expansion

    def full(self, a: Address) -> str:
        return f"{a.local}@{a.domain or self.c.local.primary_domain}"

    def address(self, a: Address, via: Via, chain: tuple[str, ...], depth: int) -> Node:
        shown = self.full(a)
        if depth > MAX_DEPTH:
            return Node(shown, "too deep", error=RouteError(ALIAS_LOOP, f"nesting deeper than {MAX_DEPTH} at {shown}"))
        if not is_our_domain(a.domain, self.c):
            return Node(shown, f"remote {a.domain}", dest=Remote(str(a), a.domain, via))
        if any(c in a.local for c in "%!@"):
            return Node(shown, "refused", error=RouteError(RELAY_DENIED, f"local part carries another address: {a}"))
        domain = a.domain or self.c.local.primary_domain
        lowered = f"{a.local.lower()}@{domain}"
        listed = self.c.list_addresses.get(lowered) or self.c.list_addresses.get(self._untagged(lowered))
        if listed:
            return self.list_(listed[0], listed[1], shown, via, chain, depth)
        if domain in self.c.virtual:
            return self.virtual(a, domain, shown, via, chain, depth)
        return self.local(a.local.lower(), shown, via, chain, depth)

    def _untagged(self, lowered: str) -> str:
        local, _, domain = lowered.rpartition("@")
        names = _candidates(local, self.c.local.recipient_delimiter)
        return f"{names[-1]}@{domain}"

    def list_(self, lst: MailingList, role: str, shown: str, via: Via, chain: tuple[str, ...], depth: int) -> Node:
        key = f"lists.{lst.name}"
        if role == "owner":
            node = Node(shown, f"list {lst.name} owner", f"{key}.owner")
            for target in lst.owner:
                node.children.append(self.target(target, via, chain, depth + 1))
            return node
        if key in chain:
            return Node(shown, f"list {lst.name}", key, error=RouteError(ALIAS_LOOP, f"list loop at {shown}"))
        members = self.t.list_members(lst)
        refusal = self.may_post(lst, members)
        if refusal:
            return Node(shown, f"list {lst.name}", key, error=refusal)
        local, _, domain = lst.address.rpartition("@")
        headers = (
            ("List-Id", f"<{lst.list_id}>"),
            ("List-Post", f"<mailto:{lst.address}>" if lst.policy != "announce" else "NO"),
            ("List-Unsubscribe", f"<mailto:{lst.request_address}?subject=unsubscribe>"),
            ("List-Help", f"<mailto:{lst.request_address}?subject=help>"),
            ("Precedence", "list"),
        )
        inner = Via(sender=lst.bounce_address, list_id=lst.list_id, headers=headers)
        post = ListPost(lst.name, lst.address, members, inner)
        node = Node(shown, f"list {lst.name} ({len(members)} members, envelope sender <{lst.bounce_address}>)",
                    f"{key}.members" + (" + members_file" if lst.members_file else ""), dest=post, members=True)
        for member in members:
            node.children.append(self.target(member, inner, (*chain, key), depth + 1))
        return node

    def may_post(self, lst: MailingList, members: tuple[str, ...]) -> RouteError | None:
        if self.sender is None or lst.policy == "open":
            return None
        allowed = lst.posters if lst.policy == "announce" else members
        wanted = {m.lower() if "@" in m else f"{m.lower()}@{self.c.local.primary_domain}" for m in allowed}
        if self.sender in wanted:
            return None
        return RouteError(NOT_A_POSTER, f"<{self.sender}> may not post to {lst.address} (policy {lst.policy})")

    def virtual(self, a: Address, domain: str, shown: str, via: Via, chain: tuple[str, ...], depth: int) -> Node:
        table = self.c.virtual[domain]
        for name in [*_candidates(a.local.lower(), self.c.local.recipient_delimiter), "*"]:
            if name in table:
                key = f'virtual."{domain}".' + (f'"{name}"' if name == "*" else name)
                rule = f"virtual {domain} {'catch-all' if name == '*' else name}"
                targets = table[name]
                if not isinstance(targets, tuple):
                    return self.special(targets, shown, rule, key)
                node = Node(shown, rule, key)
                for target in targets:
                    node.children.append(self.target(target, via, chain, depth + 1))
                return node
        if a.local.lower() == "postmaster":
            node = Node(shown, f"virtual {domain} postmaster", "(RFC 5321 4.5.1)")
            node.children.append(self.local("postmaster", f"postmaster@{self.c.local.primary_domain}",
                                             via, chain, depth + 1))
            return node
        return Node(shown, f"virtual {domain}", f'virtual."{domain}"',
                    error=RouteError(UNKNOWN_USER, f"no entry for {shown} in virtual.{domain}"))

    def target(self, target: str, via: Via, chain: tuple[str, ...], depth: int) -> Node:
        a = Address.from_str(target) if "@" in target else Address(target, "")
        return self.address(a, via, chain, depth)

    def local(self, local: str, shown: str, via: Via, chain: tuple[str, ...], depth: int) -> Node:
        for name in _candidates(local, self.c.local.recipient_delimiter):
            if name in self.c.aliases:
                key = f"aliases.{name}"
                if key in chain:
                    if self.known(name):
                        return self.user(name, shown, via, chain, depth)
                    return Node(shown, f"alias {name}", key,
                                error=RouteError(ALIAS_LOOP, f"alias loop: {' -> '.join((*chain, key))}"))
                targets = self.c.aliases[name]
                if not isinstance(targets, tuple):
                    return self.special(targets, shown, f"alias {name}", key)
                node = Node(shown, f"alias {name}", key)
                for target in targets:
                    child_chain = (*chain, key)
                    if target.lower() == name and self.known(name):  # alice = ["alice", ...]
                        node.children.append(self.mailbox(name, shown, via))
                        continue
                    node.children.append(self.target(target, via, child_chain, depth + 1))
                return node
            if self.known(name):
                return self.user(name, shown, via, chain, depth)
        if local == "postmaster" and self.c.users:
            first = next(iter(self.c.users))
            node = Node(shown, "postmaster (no alias: first user)", "(RFC 5321 4.5.1)")
            node.children.append(self.user(first, f"{first}@{self.c.local.primary_domain}", via, chain, depth + 1))
            return node
        if local == "postmaster" and self.known("root"):  # system accounts, as /etc/aliases has it
            node = Node(shown, "postmaster (no alias: root)", "(RFC 5321 4.5.1)")
            node.children.append(self.local("root", f"root@{self.c.local.primary_domain}", via, chain, depth + 1))
            return node
        return Node(shown, "unknown", error=RouteError(UNKNOWN_USER, f"unknown local user {shown}"))

    def special(self, special: Refusal | Discard, shown: str, rule: str, key: str) -> Node:
        """An alias or virtual entry that answers instead of delivering."""
        if isinstance(special, Discard):
            return Node(shown, f"{rule}: discarded (:blackhole:)", key)
        kind = ":defer:" if special.temporary else ":fail:"
        reply = Reply(special.code, special.status, special.text)
        return Node(shown, f"{rule} ({kind})", key, error=RouteError(reply, f"{key} refuses {shown} ({kind})"))

    def known(self, name: str) -> bool:
        """A TOML user or (``local.system_accounts``) an account of the host."""
        return name in self.c.users or self.account(name) is not None

    def account(self, name: str) -> Account | None:
        if name in self.c.users or not self.c.local.system_accounts:
            return None  # a TOML user of the same name wins
        if name not in self.accounts:
            self.accounts[name] = self.t.account(name)
        return self.accounts[name]

    def user(self, name: str, shown: str, via: Via, chain: tuple[str, ...], depth: int) -> Node:
        key = f"forward.{name}"
        rule = self.c.forward.get(name)
        to, keep = (rule.to, rule.keep_copy) if rule else ((), False)
        account = self.account(name)
        if account is not None:  # (never a [forward] rule: those are for TOML users)
            found = self.t.dot_forward(account) if account.home is not None else None
            if found and account.home is not None:
                (to, keep), key = found, f"{account.home / '.forward'} (local.system_accounts)"
        elif not rule and self.c.local.allow_dot_forward:
            found = self.t.dot_forward(self.c.users[name])
            if found:
                (to, keep), key = found, f"{self.c.users[name].path / '.forward'} (local.allow_dot_forward)"
        if not to or key in chain:  # no forwarding, or forwarded back to ourselves
            return self.mailbox(name, shown, via)
        node = Node(shown, f"forward {name}" + (" (keep a copy)" if keep else ""), key)
        if keep:
            node.children.append(self.mailbox(name, shown, via))
        fwd = replace(via, forwarder=name)
        for target in to:
            node.children.append(self.target(target, fwd, (*chain, key), depth + 1))
        return node

    def mailbox(self, name: str, shown: str, via: Via) -> Node:
        account = self.account(name)
        if account is not None:
            lmtp = lmtp_for(account.name, None, self.origin, self.c)
            dest = Mailbox(account.name, account.mailbox, "mbox", shown, via, account, lmtp)
            return Node(shown, f"account {name} (uid {account.uid})", "local.system_accounts", dest=dest)
        user = self.c.users[name]
        dest = Mailbox(user.name, user.path, user.mailbox_format, shown, via, lmtp=lmtp_for(name, user, self.origin,
                                                                                             self.c))
        return Node(shown, f"user {name}", f"users.{name}", dest=dest)


def _candidates(local: str, delimiters: str) -> list[str]:
    names = [local]
    if delimiters:
        cut = min((i for i in (local.find(d) for d in delimiters) if i > 0), default=-1)
        if cut > 0:
            names.append(local[:cut])
    return names
