"""From what was read to monomail's tables: users, aliases, virtual entries, forwards.

Job: decide what each `Target` becomes in monomail.toml. A local name that is an alias
stays a name; one that is no alias is a login account (a ``[users.NAME]`` table); a
tagged name ``name+tag`` becomes ``name+tag@DOMAIN``; a special item becomes its
monomail.toml spelling (``addrlist.format_special``). What cannot be a monomail name is
reported. An alias left with no targets is left out, and so is every target that led
only to it; a target naming a refusing alias beside other targets is left out too
(monomail would refuse the whole address for it, where sendmail delivers the rest).
Writing the TOML is ``render``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..addrlist import format_special
from ..settings import Refusal
from .model import USER_NAME, Loc, Resolved, Target, show
from .reading import Reader


@dataclass(frozen=True, slots=True)
class Translation:
    users: dict[str, Loc]
    aliases: dict[str, list[Resolved]]
    virtual: dict[str, dict[str, Resolved]]
    forwards: dict[str, list[Resolved]]
    report: tuple[str, ...]


def translate(r: Reader) -> Translation:
    users: dict[str, Loc] = {}
    domain = r.domain

    def add_user(name: str, t: Target) -> bool:
        if USER_NAME.match(name):
            users.setdefault(name, t.where)
            return True
        return False

    def resolve(t: Target, owner: str | None = None) -> Resolved | None:
        if t.special is not None:
            return Resolved(format_special(t.special), t, None)
        if not t.local:
            return Resolved(t.value, t, None)
        name = t.value
        if name in r.aliases and name != owner:
            if t.noexpand:
                r.report(t.where, f"{show(t.raw)}: {name} is also an alias, which monomail expands "
                                  f"(sendmail delivers to the mailbox of user {name})")
            return Resolved(name, t, name)
        if add_user(name, t):  # a login account; or alice: \alice, ...: the account alice
            return Resolved(name, t, None)
        base, plus, _ = name.partition("+")
        if name != owner and plus and (base in r.aliases or add_user(base, t)):
            return Resolved(f"{name}@{domain}", t, base if base in r.aliases else None)
        r.report(t.where, f"{show(t.raw)} is not a valid user name (letters, digits, '.', '_', '-'); "
                          "left out")
        return None

    for name in sorted(r.forwards, key=lambda n: r.forwards[n].where):
        users.setdefault(name, r.forwards[name].where)
    aliases = {
        name: [x for t in a.targets if (x := resolve(t, name))]
        for name, a in sorted(r.aliases.items(), key=lambda kv: kv[1].where)
    }
    virtual = {
        d: {key: x for key, t in entries.items() if (x := resolve(t))}
        for d, entries in r.virtual.items()
    }
    forwards = {name: [x for t in f.targets if (x := resolve(t))] for name, f in r.forwards.items()}

    # A refusing alias beside other targets would refuse them all: it is left out of the list.
    refusing = {name for name, a in r.aliases.items() if a.targets and isinstance(a.targets[0].special, Refusal)}

    def alone(owner: str, rs: list[Resolved], more: bool = False) -> list[Resolved]:
        if not more and all(x.via in refusing for x in rs):
            return rs  # only refusing aliases: the address is refused, as in sendmail
        for x in rs:
            if x.via in refusing:
                r.report(x.target.where, f"{show(x.target.raw)} left out of {owner}: alias {x.via} refuses its "
                                         "mail, and monomail would refuse the whole address for it")
        return [x for x in rs if x.via not in refusing]

    aliases = {name: alone(name, rs) for name, rs in aliases.items()}
    forwards = {name: alone(f".forward of {name}", rs, r.forwards[name].keep_copy) for name, rs in forwards.items()}

    # An alias with nothing left is left out, and so is every target that led only to it.
    while empty := [name for name, targets in aliases.items() if not targets]:
        gone = set()
        for name in empty:
            r.report(r.aliases[name].where, f"alias {show(name)} has no translatable targets; left out")
            del aliases[name]
            if name not in users:
                gone.add(name)

        def keep(x: Resolved, gone: set[str] = gone) -> bool:
            if x.via in gone:
                r.report(x.target.where, f"{show(x.target.raw)} left out with the alias {x.via}")
                return False
            return True

        for name in aliases:
            aliases[name] = [x for x in aliases[name] if keep(x)]
        for entries in virtual.values():
            for key in [k for k, x in entries.items() if not keep(x)]:
                del entries[key]
        for name in forwards:
            forwards[name] = [x for x in forwards[name] if keep(x)]

    for d in sorted(set(r.virtual_where) - {d for d, e in virtual.items() if e}):
        r.report(r.virtual_where[d], f"virtual domain {d} has no translated entries; it is not declared")
    for name, f in r.forwards.items():
        if not forwards[name] and not f.keep_copy:
            r.report(f.where, f".forward of {name} has no translatable targets; left out")

    report = tuple(text for _, _, text in sorted(r.reports))
    return Translation(users, aliases, virtual, forwards, report)
