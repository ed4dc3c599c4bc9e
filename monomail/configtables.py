"""The address tables of monomail.toml: aliases, virtual domains, forwards and lists.

Job: read and check, for ``config``, the tables whose values are targets: every bare
target must name a user or an alias (`Names`; with ``local.system_accounts`` any account
name too, looked up when mail is routed); special targets (``:fail:``, ``:defer:``,
``:blackhole:``) stand alone; alias loops and refusing targets are warned about.
Errors name the dotted key. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from . import configkeys as keys
from .addrlist import parse_special
from .configkeys import Table, is_account_name
from .errors import ConfigError
from .settings import AliasTargets, Discard, Forward, LocalConfig, MailingList, Refusal, User


def _alias_targets(key: str, targets: list[str], names: Names | None) -> AliasTargets:
    """One alias's (or virtual entry's) targets; ``names`` None: checked later, by `aliases`."""
    if not targets:
        raise ConfigError(key, "expected at least one target")
    specials: list[tuple[str, Refusal | Discard]] = []
    for target in targets:
        try:
            special = parse_special(target, strict=True)
        except ValueError as exc:
            raise ConfigError(key, f"{target!r}: {exc}") from None
        if special is not None:
            specials.append((target, special))
        elif target.strip().startswith(":"):
            raise ConfigError(key, f'{target!r} is not a special target (":fail: text", ":defer: text" '
                                   'or ":blackhole:")')
    if specials:
        if len(targets) > 1:
            raise ConfigError(key, f"{specials[0][0]!r} must be the only target: a :fail:, :defer: or "
                                   ":blackhole: answers for the whole address")
        return specials[0][1]
    return _check_targets(key, targets, names) if names is not None else tuple(x.strip() for x in targets)


def aliases(t: Table, users: Mapping[str, User], local: LocalConfig) -> tuple[dict[str, AliasTargets], list[str]]:
    aliases: dict[str, AliasTargets] = {}
    for raw in list(t.data):
        aliases[raw.lower()] = _alias_targets(t.key(raw), t.strings(raw, []), None)
    known = target_names(users, aliases, local)
    for name, goals in aliases.items():
        if isinstance(goals, tuple):
            _check_targets(t.key(name), goals, known)
    warnings = [f"aliases.{name}: alias loop" for name in _alias_loops(aliases, users)]
    return aliases, warnings


class Names:
    """The names a bare target may take: the users and aliases declared, and with
    ``local.system_accounts`` any account name too (the passwd database is asked when
    mail is routed: 550 5.1.1 if there is none)."""

    def __init__(self, declared: set[str], accounts: bool) -> None:
        self.declared = frozenset(declared)
        self.accounts = accounts

    def __contains__(self, name: object) -> bool:
        return name in self.declared or (self.accounts and isinstance(name, str) and is_account_name(name))

    def __or__(self, more: set[str]) -> Names:
        return Names(set(self.declared) | more, self.accounts)


def target_names(users: Mapping[str, User], aliases: Mapping[str, AliasTargets], local: LocalConfig) -> Names:
    return Names(set(users) | set(aliases), local.system_accounts)


def refusing(key: str, targets: AliasTargets, aliases: Mapping[str, AliasTargets]) -> list[str]:
    """Warnings for the refusing aliases among ``targets``: they refuse the whole address."""
    out = []
    for target in targets if isinstance(targets, tuple) else ():
        goal = aliases.get(target.lower())
        if isinstance(goal, Refusal):
            out.append(f"{key}: target {target!r} refuses its mail ({goal.code} {goal.status}), so this "
                       f"address is refused as a whole; remove {target!r} to deliver to the others")
    return out


def _alias_loops(aliases: Mapping[str, AliasTargets], users: Mapping[str, User]) -> list[str]:
    """Names whose expansion comes back to itself without reaching a user of that name."""
    looped = []
    for start in aliases:
        stack, seen = [start], set()
        while stack:
            name = stack.pop()
            goals = aliases.get(name, ())
            for target in goals if isinstance(goals, tuple) else ():
                t = target.lower()
                if "@" in t:
                    continue
                if t == start and t not in users:
                    looped.append(start)
                    stack.clear()
                    break
                if t in aliases and t not in seen and t != name:
                    seen.add(t)
                    stack.append(t)
    return looped


def _check_targets(key: str, targets: Sequence[str], names: Names) -> tuple[str, ...]:
    for target in targets:
        if "@" not in target and target.lower() not in names:
            raise ConfigError(key, f"target {target!r} is neither a user nor an alias")
    return tuple(x.strip() for x in targets)


def virtual(t: Table, local: LocalConfig, names: Names) -> dict[str, dict[str, AliasTargets]]:
    out: dict[str, dict[str, AliasTargets]] = {}
    for raw in list(t.data):
        domain = keys.domain(raw, t.key(raw))
        if domain in local.domains:
            raise ConfigError(t.key(raw), "a virtual domain must not also be in local.domains")
        table = t.table(raw)
        out[domain] = {key.lower(): _alias_targets(table.key(key), table.strings(key, []), names)
                       for key in list(table.data)}
    return out


def forwards(t: Table, users: Mapping[str, User], names: Names) -> dict[str, Forward]:
    out: dict[str, Forward] = {}
    for raw in list(t.data):
        name = raw.lower()
        if name not in users:
            raise ConfigError(t.key(raw), "forwarding is set for users only; no such user")
        value = t.get(raw, None)
        if isinstance(value, list | str):
            value = {"to": value}
        f = Table(value, t.key(raw))
        to = f.strings("to", [])
        if not to:
            raise ConfigError(f.key("to"), "expected at least one address")
        out[name] = Forward(name, _check_targets(f.key("to"), to, names), f.boolean("keep_copy", False))
        f.finish()
    return out


def lists(t: Table, local: LocalConfig, virtual: Mapping[str, object], names: Names,
           base: Path) -> dict[str, MailingList]:
    out: dict[str, MailingList] = {}
    for raw in list(t.data):
        name = raw.lower()
        lt = t.table(raw)
        address = lt.string("address", f"{name}@{local.primary_domain}").strip().lower()
        local_part, at, domain = address.rpartition("@")
        if not at or not local_part or (domain not in local.domains and domain not in virtual):
            raise ConfigError(lt.key("address"), f"expected an address in one of our domains, got {address!r}")
        if local_part in names.declared and domain in local.domains:  # declared names, not every account
            raise ConfigError(lt.key("address"), f"{address!r} is also a user or alias")
        members_file = lt.string("members_file", "")
        policy = lt.string("policy", "open", ("open", "members", "announce"))
        posters = lt.strings("posters", [])
        if policy == "announce" and not posters:
            raise ConfigError(lt.key("posters"), "an announce list needs at least one poster")
        bounce = lt.string("bounce_address", f"{local_part}-bounces@{domain}").strip().lower()
        out[name] = MailingList(
            name=name,
            address=address,
            members=_check_targets(lt.key("members"), lt.strings("members", []), names),
            members_file=(base / members_file).resolve() if members_file else None,
            policy=policy,
            posters=tuple(p.strip().lower() for p in posters),
            owner=_check_targets(lt.key("owner"), lt.strings("owner", ["postmaster"]) or ["postmaster"],
                                 names | {"postmaster"}),
            bounce_address=bounce,
            list_id=lt.string("list_id", f"{local_part}.{domain}"),
        )
        lt.finish()
    return out
