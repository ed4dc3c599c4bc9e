"""``monomail import``: turn sendmail/Postfix/Exim alias files into monomail.toml tables.

Job: read an /etc/aliases file, a sendmail virtusertable and users' .forward files, and
write the equivalent monomail.toml fragment (``[local]``, ``[users.NAME]``, ``[aliases]``,
``[virtual."domain"]``, ``[forward.NAME]``) as commented TOML in a stable order, plus a
report with one line, naming file and line, for everything that could not be translated.
A pure function of its input files: it reads them (and the ``:include:`` files they
name) and nothing else; it writes nothing, runs nothing and never looks at the system
(no passwd lookups: a login account is inferred from being the final target of an alias).

Formats read, all of them with the one address-list lexer (``addrlist``), the same
one that reads ``.forward`` files at delivery time:

- aliases(5), as sendmail and Postfix read it: ``name: target, target``; a line that
  starts with whitespace continues the previous one; ``#`` starts a comment at the start
  of a line or after whitespace (not inside quotes); blank lines are ignored. Targets are
  separated by commas (or, without ``<>``, whitespace), may be quoted (``"..."``), carry
  ``(comments)`` or a ``Name <addr>`` phrase, and may be a local name, ``user@domain``,
  ``\\user`` (this login account, no further alias expansion), ``:include:/path`` (a
  relative path is relative to the folder of the file naming it), ``|command``,
  ``/path/file``, or a special item: Exim's ``:fail: text``, ``:defer: text`` and
  ``:blackhole:``, sendmail's ``error:5.1.1:550 text`` and ``:error:5.1.1 text``.
- sendmail virtusertable, text form (the input of makemap): ``user@domain  target`` and
  ``@domain  target`` (catch-all), whitespace-separated, ``#`` comments. Each domain
  becomes a ``[virtual."domain"]`` table, except the primary domain, which monomail
  does not allow as a virtual domain: its entries become aliases, replacing an
  /etc/aliases entry of the same name (sendmail reads the virtusertable first).
- forward(5): the same lists; ``\\user`` (the owner's own name) keeps a copy in the
  owner's mailbox.

Targets ``user@DOMAIN`` and ``user@localhost`` are written as the bare local name. A
local target ``name+tag`` becomes ``name+tag@DOMAIN``, which the router delivers to
``name`` when the recipient delimiter is ``+`` (the default).

Refusals are translated: an alias or virtusertable entry that is ``:fail:``,
``:error:`` or ``error:`` becomes ``[":fail: 5.1.1 This user has left"]`` (or
``":defer: 4.x.x ..."``), which monomail answers at RCPT time with that code and text;
``:blackhole:``, or ``/dev/null`` alone, becomes ``[":blackhole:"]`` (``/dev/null``
beside other targets is left out: it delivers nothing). As Exim reads it, a special
item answers for the whole alias: the other targets are reported and left out. A target
naming a refusing alias beside other targets is left out and reported (monomail would
refuse the whole address for it).

Not translated, and reported instead (monomail has no such delivery from its tables):
pipes to programs, deliveries to files, special items in a .forward, ``%1``-style
substitutions, ``+*`` keys, a catch-all for the primary domain, names that cannot be
monomail user names, missing or unreadable ``:include:`` files, items and lines that do
not parse (never turned into names), duplicate definitions (the first is kept), and
aliases, virtual entries or forwards left with no target. A ``\\name`` target where
``name`` is also an alias is kept as ``name`` and reported: monomail always expands an
alias of that name.

The package: ``reading`` (input files → targets, and the report), ``translate``
(targets → users, aliases, virtual entries, forwards), ``render`` (the TOML, the only
user of ``tomli_w``), ``command`` (`convert` and `main`), ``model`` (what they share).

Not here: installing the result (the admin merges it into monomail.toml and runs
``monomail check-config``), login accounts that no input file names, and the CLI wiring
(``cli`` calls `main`).

Error handling: `convert` raises `OSError` when one of the named input files cannot be
read (a missing ``:include:`` file is only reported); `main` prints that as one line
and exits 2.
"""

from __future__ import annotations

from .command import convert, main
from .model import ImportResult

__all__ = ["ImportResult", "convert", "main"]
