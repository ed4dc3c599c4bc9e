"""``monomail sendmail`` flags: sendmail(8)'s command line, getopt style.

Job: turn the argument vector into `Options` (clusters such as ``-ti``; a value attached
or in the next word; options end at the first word that is not one, or at ``--``), or
raise ``errors.UsageError``. Sendmail and Postfix flags that make no sense here are
accepted and ignored, so callers' command lines keep working; ``--help`` asks for `HELP`.

Not here: what the flags do (``monomail.sendmail``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UsageError

USAGE = "usage: monomail sendmail [-t] [-i] [-f sender] [-F name] [-bm|-bs|-bp] [-q] [-v] [recipient ...]"
HELP = f"""{USAGE}

Submit one message, read on standard input, as sendmail(8) does.

  recipient ...   addresses to send to (a bare name gets local.primary_domain)
  -t              also send to the To, Cc and Bcc addresses of the message (Bcc is removed)
  -i, -oi         a line holding a single '.' does not end the message
  -oem, -oee      mail errors back: refused recipients become a bounce to the sender
                  (exit 0), as cron asks
  -f, -r sender   envelope sender ('' or '<>': the null sender); default: your login@primary
                  domain; honoured for trusted users only (root, the server's user,
                  local.trusted_users): for others it is ignored
  -F name         full name for a From field the message lacks
  -bm             deliver the message (the default)
  -bs             speak SMTP on standard input and output
  -bp             list the queue (as 'monomail queue list'; also 'mailq')
  -bi             check the config: aliases are read from it (also 'newaliases')
  -q              retry the whole queue now (as 'monomail queue flush')
  -v              show the SMTP dialogue and what happened, on standard error
  --help          this text

Accepted and ignored: other -oX..., -B type, -N dsn, -L tag, -C file, -R ret, -V envid,
-X file, -O opt=value, -h hops, -n, -m, -U, -G, -d..., -A....
The configuration is $MONOMAIL_CONFIG, else ./monomail.toml, else /etc/monomail/monomail.toml.
Exit status (sysexits.h): 0 sent or queued, 64 usage, 65 bad data, 67 recipient refused,
69 message refused, 71 standard input unreadable, 75 try again later, 78 configuration."""

_WITH_VALUE = set("frFBNLCRVXOh")  # -x value or -xvalue
_ATTACHED = set("obqdAMp")  # -xrest, the rest of the word
_PLAIN = set("tivnmUG")


@dataclass
class Options:
    mode: str = "m"  # m: deliver, s: SMTP on stdio, p: list the queue, q: flush the queue, i: aliases, help
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    verbose: bool = False  # -v
    errors_mailed: bool = False  # -oem / -oee: refused recipients become a bounce, exit 0
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """sendmail's flags, getopt style. Raises `UsageError`."""
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            i += 1
            break
        if word == "--help":
            opts.mode = "help"
            i += 1
            continue
        if not word.startswith("-") or word == "-":
            break
        j = 1
        while j < len(word):
            ch, rest = word[j], word[j + 1 :]
            if ch in _PLAIN:
                _flag(opts, ch)
                j += 1
                continue
            if ch in _WITH_VALUE:
                if rest:
                    value = rest
                else:
                    i += 1
                    if i >= len(args):
                        raise UsageError(f"option -{ch} requires an argument")
                    value = args[i]
                _valued(opts, ch, value)
            elif ch in _ATTACHED:
                _attached(opts, ch, rest)
            else:
                raise UsageError(f"unknown option -{ch}")
            break
        i += 1
    opts.recipients = args[i:]
    return opts


def _flag(opts: Options, ch: str) -> None:
    if ch == "t":
        opts.extract = True
    elif ch == "i":
        opts.ignore_dots = True
    elif ch == "v":
        opts.verbose = True
    # -n (no aliasing), -m (me too), -U (initial submission), -G (gateway): ignored


def _valued(opts: Options, ch: str, value: str) -> None:
    if ch in "fr":
        opts.sender = value
    elif ch == "F":
        opts.full_name = value
    # -B body type, -N dsn, -L tag, -C config, -R ret, -V envid, -X log, -O opt, -h hops: ignored


def _attached(opts: Options, ch: str, rest: str) -> None:
    if ch == "o":
        if not rest:
            raise UsageError("option -o requires a value (such as -oi)")
        if rest == "i":
            opts.ignore_dots = True
        elif rest.startswith("e") and len(rest) == 2:
            opts.errors_mailed = rest[1] in "me"  # -oep / -oeq / -oew: printed, as without
        # -odi, -odb, -odq, -oQdir, any other -oX...: ignored
    elif ch == "b":
        if rest in ("m", "s", "p"):
            opts.mode = rest
        elif rest in ("i", "I"):
            opts.mode = "i"
        elif rest in ("d", "D"):
            raise UsageError(f"-b{rest} is not supported: run 'monomail serve'")
        elif rest in ("t", "v"):
            raise UsageError(f"-b{rest} is not supported: use 'monomail route ADDRESS'")
        else:
            raise UsageError(f"unknown mode -b{rest}")
    elif ch == "q":
        opts.mode = "q"  # -q, -q30m, -qR..., -qI...: retry the whole queue now
    # -d (debug), -A (submit/MTA), -M (macro), -p (protocol): ignored
