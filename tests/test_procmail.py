"""Unit tests of `monomail.procmail`: the parser, the egrep dialect, the evaluator.

No sockets, no real programs: a recording executor stands in for the mailbox writers,
the MTA queue and programs (whose behaviour each test scripts). Folders are written
nowhere, but HOME is a real temporary directory because the engine, like procmail,
requires a folder's parent directory to exist.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from monomail import procmail
from monomail.procmail import RecipeError, parse, run

MSG = b"""Return-Path: <bob@example.org>
Delivered-To: alice@example.test
From: Bob Example <bob@example.org>
To: alice@example.test,
\tcarol@example.test
Subject: Hello World
Content-Type: text/plain

Hi Alice,
From the start this was a test.
"""
WHEN = 1_725_357_600.0
FROM_ = f"From bob@example.org  {time.ctime(WHEN)}\n".encode()

PipeFn = Callable[[list[str], bytes, dict[str, str], bool], tuple[int, bytes]]


class Recorder:
    """An in-memory executor: records every call; ``fail`` maps a folder path's last
    component to the exception its delivery raises; ``programs`` scripts programs."""

    def __init__(self, home: Path, fail: dict[str, BaseException] | None = None,
                 programs: dict[str, PipeFn] | None = None) -> None:
        self.home = home
        self.calls: list[tuple] = []
        self.fail = fail or {}
        self.programs = programs or {}
        self.lines: list[str] = []

    def _check(self, path: Path) -> None:
        exc = self.fail.get(path.name)
        if exc is not None:
            raise exc

    def to_mbox(self, path: Path, message: bytes, lock: bool) -> None:
        self._check(path)
        self.calls.append(("mbox", self.rel(path), message, lock))

    def to_maildir(self, path: Path, message: bytes) -> str:
        self._check(path)
        self.calls.append(("maildir", self.rel(path), message))
        return f"file{len(self.calls)}"

    def forward(self, addresses: list[str], message: bytes) -> None:
        self.calls.append(("forward", tuple(addresses), message))

    def pipe(self, argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        self.calls.append(("pipe", tuple(argv), message, capture))
        fn = self.programs.get(argv[0])
        if fn is None:
            raise FileNotFoundError(argv[0])
        return fn(argv, message, env, capture)

    def log(self, line: str) -> None:
        self.lines.append(line)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.home))
        except ValueError:
            return str(path)

    def folders(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] in ("mbox", "maildir")]

    def written(self, folder: str) -> bytes:
        return next(c[2] for c in self.calls if c[0] in ("mbox", "maildir") and c[1] == folder)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "alice"
    h.mkdir()
    return h


def go(rc_text: str, home: Path, message: bytes = MSG, *, ex: Recorder | None = None,
       env: dict[str, str] | None = None, **kw) -> tuple[procmail.Result, Recorder]:
    ex = ex or Recorder(home)
    base = {"HOME": str(home), "LOGNAME": "alice", "SENDER": "bob@example.org", "DEFAULT": str(home / "Mailbox")}
    result = run(parse(rc_text, "rc"), message, {**base, **(env or {})}, ex, when=WHEN, **kw)
    return result, ex


def matches(condition: str, home: Path, flags: str = "", message: bytes = MSG, **kw) -> bool:
    _, ex = go(f":0 {flags}\n* {condition}\nyes\n", home, message, **kw)
    return ex.folders() == ["yes"]


def upper(argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
    """Upper-case all but a leading From_ line."""
    if message.startswith(b"From "):
        first, rest = message.split(b"\n", 1)
        return 0, first + b"\n" + rest.upper()
    return 0, message.upper()


def exits(code: int, out: bytes = b"") -> PipeFn:
    return lambda argv, message, env, capture: (code, out)


# ---------------------------------------------------------------------------- parser


def test_parse_recipe_parts() -> None:
    rc = parse(":0 HBc: my.lock\n* ^Subject: x\n*  ! ^From: y  \ninbox\n", "f")
    (r,) = rc.statements
    assert isinstance(r, procmail.Recipe)
    assert r.flags == frozenset("HBc") and r.lock and r.lockfile == "my.lock" and r.line == 1
    assert [c.text for c in r.conditions] == ["^Subject: x", "! ^From: y"]
    assert [c.line for c in r.conditions] == [2, 3]
    assert (r.kind, r.action) == ("folder", "inbox")


def test_parse_assignments() -> None:
    rc = parse('A=1\nB = two  # comment\nC="x y"\nD\nE=\n', "f")
    assert [(a.name, a.value) for a in rc.statements] == [
        ("A", "1"), ("B", "two"), ("C", '"x y"'), ("D", None), ("E", "")]


def test_parse_blocks_and_actions() -> None:
    rc = parse(":0\n* a\n{\n  X=1\n  :0 c\n  ! a@b\n  :0\n  | /bin/x y\n}\n:0\nVAR=| /bin/y\n", "f")
    block, capture = rc.statements
    assert block.kind == "block"
    assert [type(s).__name__ for s in block.block] == ["Assignment", "Recipe", "Recipe"]
    assert [(s.kind, s.action.strip()) for s in block.block[1:]] == [("forward", "a@b"), ("pipe", "/bin/x y")]
    assert (capture.kind, capture.capture, capture.action.strip()) == ("pipe", "VAR", "/bin/y")


def test_parse_old_style_and_comments() -> None:
    rc = parse("# c\n\n:2 c\n^A\n^B\n# between\n\nfolder # trailing\n", "f")
    (r,) = rc.statements
    assert [c.text for c in r.conditions] == ["^A", "^B"] and r.action.strip() == "folder"


def test_parse_continuations() -> None:
    rc = parse(":0\n* ^Subject:\\\n   .*x\n| /bin/a \\\n  b\n", "f")
    (r,) = rc.statements
    assert r.conditions[0].text == "^Subject:.*x"
    assert r.action == " /bin/a \\\n  b"


@pytest.mark.parametrize(("text", "line", "reason"), [
    (":0 Hx\ninbox\n", 1, "unknown flag 'x'"),
    ("A=1\n}\n", 2, "unexpected '}'"),
    ("A=1\n:0\n{\n  :0\n  inbox\n", 3, "missing '}'"),
    ('A=1\nB="open\n\n', 2, "unterminated quote"),
    (":0\n* ^a\n", 1, "without an action"),
    (":0\n* ^a\n\n:0\nx\n", 1, "without an action"),
    ("A=1\ninbox/\n", 2, "expected a recipe"),
    (":0\n* ^(a\ninbox\n", 2, "unbalanced '('"),
    (":0\n* a)\ninbox\n", 2, "unbalanced ')'"),
    (":0\n* 2^1 ^Subject\ninbox\n", 2, "scoring"),
    (":0\n* ^(a\\/b)\ninbox\n", 2, "inside parentheses"),
    (":0\nX=! a@b\n", 2, "not supported"),
    (":0: a b\ninbox\n", 1, "after the lockfile"),
    (":0\n|\n", 2, "without a program"),
    ("\n\n:0\n!   \n", 4, "without an address"),
    (":0\n* < lots\ninbox\n", 2, "without a number"),
])
def test_syntax_errors_name_the_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse(text, "/home/alice/.procmailrc")
    assert info.value.line == line and reason in info.value.reason
    assert str(info.value).startswith(f"/home/alice/.procmailrc:{line}: ")


# ---------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(("condition", "flags", "expected"), [
    ("^Subject: Hello World$", "", True),
    ("^subject: hello", "", True),            # case-insensitive by default
    ("^subject: hello", "D", False),
    ("^Subject: Hello", "D", True),
    ("^Subject:.*Hello.World", "", True),
    ("^Subject:.*$.*Content", "", True),      # $ is a newline
    ("Subject.Hello.*Content", "", False),    # . never crosses a line
    ("World[^x]Content", "", False),          # [^...] never matches a newline
    ("^To:.*alice.*carol", "", True),         # continued fields are joined
    ("^^From bob@example\\.org  ", "", True),  # the From_ line opens the header
    ("^^Return-Path", "", False),
    ("text/plain$^^", "", False),             # the header ends with its empty line
    ("text/plain$$^^", "", True),
    ("^Hi Alice", "", False),                 # H is the default
    ("^Hi Alice", "B", True),
    ("^^Hi Alice", "B", True),
    ("test\\.$^^", "B", True),
    ("^Subject:.*$(.*$)*Hi Alice", "HB", True),
    ("^Subject: Hel+o (World|Moon)", "", True),
    ("^Subject: Hello{1}", "", False),        # { } are plain characters
    ("*Subject", "", False),                  # a leading * is a plain character
    ("\\<World\\>", "", False),               # a leading \ quotes: this is "<World\>"
    (".\\<World\\>", "", True),
    ("Hel\\>", "", False),
    ("\\/foo", "", False),
    ("^TO_carol@example\\.test", "", True),
    ("^TO_arol@example\\.test", "", False),
    ("^TOcarol", "", True),
    ("^TOarol", "", False),
    ("^FROM_DAEMON", "", False),
    ("^FROM_MAILER", "", False),
    ("[[:alpha:]]", "", False),               # no named classes: [:alph then ]
    ("[]x]Hello", "", False),
    ("^Content-Type: text/[a-z]+$", "", True),
    ("", "", True),
])
def test_regex_dialect(condition: str, flags: str, expected: bool, home: Path) -> None:
    assert matches(condition, home, flags) is expected


def test_daemon_macros(home: Path) -> None:
    bounce = b"From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\nSubject: x\n\nbody\n"
    listmail = b"From: someone@example.org\nPrecedence: bulk\n\nbody\n"
    assert matches("^FROM_DAEMON", home, message=bounce, sender="")
    assert matches("^FROM_MAILER", home, message=bounce, sender="")
    assert matches("^FROM_DAEMON", home, "D", message=listmail)  # always case-insensitive
    assert not matches("^FROM_MAILER", home, message=listmail)


def test_size_conditions_count_the_from_line(home: Path) -> None:
    size = len(FROM_) + len(MSG)
    assert matches(f"< {size + 1}", home) and not matches(f"< {size}", home)
    assert matches(f"> {size - 1}", home) and not matches(f"> {size}", home)
    assert matches(f"! < {size}", home)
    body = MSG.split(b"\n\n", 1)[1]
    assert matches(f"B ?? < {len(body) + 1}", home) and not matches(f"B ?? > {len(body)}", home)


def test_negation_and_conjunction(home: Path) -> None:
    assert matches("! ^X-Spam", home)
    assert not matches("!^Subject", home)
    assert matches("! ! ^Subject", home)
    _, ex = go(":0\n* ^Subject\n* ^From:.*nobody\nno\n:0\n* ^Subject\n* ^From:.*bob\nyes\n", home)
    assert ex.folders() == ["yes"]


def test_variable_and_dollar_conditions(home: Path) -> None:
    env = {"WORD": "World", "PAT": "[x] (y)"}
    assert matches("$ ^Subject:.*$WORD", home, env=env)
    assert matches("$ ^Subject:.*${NOPE:-Hello}", home, env=env)
    assert matches("$ ! ^Subject:.*$PAT", home, env=env)
    assert matches("WORD ?? ^^World^^", home, env=env)
    assert matches("NOPE ?? ^^^^", home, env=env)
    assert matches("H ?? ^Subject", home) and not matches("B ?? ^Subject", home)
    assert matches("HB ?? Hi Alice", home)
    msg = MSG.replace(b"Hello World", b"[x] (y) here")
    assert matches("$ ^Subject: $\\PAT here", home, env=env, message=msg)
    assert not matches("$ ^Subject: $PAT here", home, env=env, message=msg)


def test_match_extraction(home: Path) -> None:
    _, ex = go(":0\n* ^Subject:\\/.*\n{ S=$MATCH }\n:0\n* ^From:.*\\/[a-z]+@[a-z.]+\n{ F=$MATCH }\n"
               ':0\n* ^Subject: \\/[a-z]+\n"$S|$F|$MATCH"\n', home)
    assert ex.folders() == [" Hello World|bob@example.org|Hello"]


def test_match_with_trailing_newline(home: Path) -> None:
    _, ex = go(':0\n* ^Subject:\\/.*$\n{ M="<$MATCH>" }\n:0\n"$M"\n', home)
    assert ex.folders() == ["< Hello World\n>"]


# ---------------------------------------------------------------------------- flags


def test_first_delivering_recipe_wins_and_c_copies(home: Path) -> None:
    result, ex = go(":0 c\ncopy\n:0\n* ^Subject\nfirst\n:0\nnever\n", home)
    assert result.delivered and ex.folders() == ["copy", "first"]


def test_fall_off_the_end_delivers_to_default(home: Path) -> None:
    result, ex = go(":0\n* ^X-Nothing\nnope\n", home)
    assert result.delivered and ex.folders() == ["Mailbox"]
    assert ex.calls[0][3] is True  # DEFAULT is locked
    result, ex = go(":0\n* ^X-Nothing\nnope\n", home, env={"DEFAULT": str(home / "Maildir") + "/"})
    assert result.delivered and ex.calls[0][:2] == ("maildir", "Maildir")


def test_default_failure_or_off_leaves_delivery_to_the_caller(home: Path) -> None:
    result, ex = go("", home, ex=Recorder(home, fail={"Mailbox": OSError(28, "No space left")}))
    assert not result.delivered and "No space left" in result.errors[0]
    result, ex = go("", home, deliver_default=False)
    assert not result.delivered and ex.calls == []
    result, ex = go("", home, env={"DEFAULT": ""})
    assert not result.delivered


def test_A_and_a(home: Path) -> None:
    rc = (":0 c\n* ^Subject\nfirst\n:0 Ac\nalso\n:0 c\n* ^X-No\nmissed\n:0 Ac\nnot-after-miss\n"
          ":0 c\nblocked\n:0 c\n* ^Subject\nblocked/x\n:0 ac\nnot-after-failure\n:0 c\nok\n:0 ac\nafter-success\n")
    _, ex = go(rc, home, ex=Recorder(home, fail={"x": NotADirectoryError("blocked")}))
    assert ex.folders() == ["first", "also", "blocked", "ok", "after-success", "Mailbox"]


def test_E_chain(home: Path) -> None:
    rc = ":0\n* ^X-No\none\n:0 E\n* ^X-Also-No\ntwo\n:0 E\n* ^Subject\nthree\n:0 E\nfour\n"
    _, ex = go(rc, home)
    assert ex.folders() == ["three"]
    _, ex = go(":0 c\n* ^Subject\nfirst\n:0 E\nelse\n", home)
    assert ex.folders() == ["first", "Mailbox"]


def test_e_runs_after_a_failed_action(home: Path) -> None:
    rc = ":0\n* ^Subject\nbroken\n:0 e\nrescue\n"
    _, ex = go(rc, home, ex=Recorder(home, fail={"broken": PermissionError("outside HOME")}))
    assert ex.folders() == ["rescue"]
    _, ex = go(":0 c\nfine\n:0 e\nnot-after-success\n", home)
    assert ex.folders() == ["fine", "Mailbox"]


def test_h_and_b_choose_the_part(home: Path) -> None:
    _, ex = go(":0 hc\nheads\n:0 bc\nbodies\n:0 hc\nmd/\n:0 hb\nboth\n", home)
    header, body = MSG.split(b"\n\n", 1)
    assert ex.written("heads") == header + b"\n"  # the mbox writer adds the separator
    assert ex.written("bodies") == body
    assert ex.written("md") == header + b"\n\n"
    assert ex.written("both") == MSG


def test_lock_marker_reaches_the_executor(home: Path) -> None:
    _, ex = go(":0 c:\nlocked\n:0 c\nunlocked\n:0: named.lock\nnamed\n", home)
    assert [(c[1], c[3]) for c in ex.calls] == [("locked", True), ("unlocked", False), ("named", True)]


def test_dev_null_discards(home: Path) -> None:
    result, ex = go(":0\n* ^Subject\n/dev/null\n", home)
    assert result.delivered and ex.calls == [] and "discarded" in result.actions[0]


def test_forward(home: Path) -> None:
    result, ex = go(':0 c\n! carol@example.net "dave@example.net"\n:0 h\n! $LOGNAME@example.net\n', home)
    header = MSG.split(b"\n\n", 1)[0] + b"\n\n"
    assert ex.calls == [("forward", ("carol@example.net", "dave@example.net"), MSG + b"\n"),
                        ("forward", ("alice@example.net",), header)]
    assert result.delivered


def test_r_keeps_text_raw(home: Path) -> None:
    _, ex = go(":0 r\n! raw@example.net\n", home)
    assert ex.calls[0][2] == MSG


# ---------------------------------------------------------------------------- programs


def test_pipes_disabled_fall_through(home: Path) -> None:
    result, ex = go(":0\n| /bin/prog\n:0 fw\n| /bin/prog\n:0\n* ? /bin/prog\nyes\nX=`/bin/prog`\n", home)
    assert ex.folders() == ["Mailbox"] and not [c for c in ex.calls if c[0] == "pipe"]
    assert len(result.errors) == 4 and all("disabled" in e for e in result.errors)


def test_delivering_pipe(home: Path) -> None:
    ex = Recorder(home, programs={"/usr/bin/deliver": exits(3)})
    result, ex = go(':0\n| /usr/bin/deliver --to "$LOGNAME" ~/x\n', home, ex=ex, allow_pipes=True)
    assert result.delivered  # without w the exit code is ignored
    argv, data = ex.calls[0][1], ex.calls[0][2]
    assert argv == ("/usr/bin/deliver", "--to", "alice", f"{home}/x")
    assert data == FROM_ + MSG + b"\n"  # programs get the From_ line and a final empty line


def test_pipe_w_checks_the_exit_code(home: Path) -> None:
    ex = Recorder(home, programs={"/bin/p": exits(1)})
    result, ex = go(":0 w\n| /bin/p\n:0 e\nafter-failure\n", home, ex=ex, allow_pipes=True)
    assert ex.folders() == ["after-failure"] and "exited 1" in result.errors[0]
    ex = Recorder(home, programs={"/bin/p": exits(1)})
    _, ex = go(":0:\n| /bin/p\n", home, ex=ex, allow_pipes=True)  # a lock implies W
    assert ex.folders() == ["Mailbox"]


def test_hanging_pipe_times_out_and_falls_through(home: Path) -> None:
    def hang(argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        raise TimeoutError("killed after 60s")

    ex = Recorder(home, programs={"/usr/bin/slow": hang})
    result, ex = go(":0\n| /usr/bin/slow\n", home, ex=ex, allow_pipes=True)
    assert result.delivered and ex.folders() == ["Mailbox"]
    assert "TimeoutError" in result.errors[0]


def test_program_not_found_is_a_failure(home: Path) -> None:
    result, ex = go(":0\n| /no/such/program\n", home, allow_pipes=True)
    assert ex.folders() == ["Mailbox"] and "FileNotFoundError" in result.errors[0]


def test_i_forgives_an_early_close(home: Path) -> None:
    def closes(argv: list[str], message: bytes, env: dict[str, str], capture: bool) -> tuple[int, bytes]:
        raise BrokenPipeError(32, "Broken pipe")

    ex = Recorder(home, programs={"/bin/p": closes})
    result, _ = go(":0 i\n| /bin/p\n", home, ex=ex, allow_pipes=True)
    assert result.delivered and not result.errors
    ex = Recorder(home, programs={"/bin/p": closes})
    _, ex = go(":0\n| /bin/p\n", home, ex=ex, allow_pipes=True)
    assert ex.folders() == ["Mailbox"]


def test_shell_syntax_is_refused(home: Path) -> None:
    ex = Recorder(home, programs={"/bin/sh": exits(0), "/bin/sed": exits(0)})
    result, ex = go(":0\n| /bin/sh -c 'true' ; rm -rf ~\n:0 c\n| /bin/sed -e 's/a;b/c/'\n", home, ex=ex,
                    allow_pipes=True)
    assert "needs a shell (;)" in result.errors[0]
    assert [c[1] for c in ex.calls if c[0] == "pipe"] == [("/bin/sed", "-e", "s/a;b/c/")]  # quoted is fine


def test_filter_replaces_the_message(home: Path) -> None:
    ex = Recorder(home, programs={"/bin/up": upper})
    result, ex = go(":0 fw\n| /bin/up\n:0\n* ^SUBJECT: HELLO\nupper\n", home, ex=ex, allow_pipes=True)
    assert ex.written("upper") == MSG.upper()  # From_ line off, the mbox separator is the writer's
    assert result.message == MSG.upper() + b"\n"


def test_filter_header_or_body_only(home: Path) -> None:
    ex = Recorder(home, programs={"/bin/up": upper})
    header, body = MSG.split(b"\n\n", 1)
    result, _ = go(":0 fhw\n| /bin/up\n", home, ex=ex, allow_pipes=True)
    assert result.message == header.upper() + b"\n\n" + body
    ex = Recorder(home, programs={"/bin/up": upper})
    result, _ = go(":0 fbw\n| /bin/up\n", home, ex=ex, allow_pipes=True)
    assert result.message == header + b"\n\n" + body.upper() + b"\n"


def test_failed_filter_leaves_the_message(home: Path) -> None:
    ex = Recorder(home, programs={"/bin/f": exits(2, b"garbage\n")})
    result, ex = go(":0 fw\n| /bin/f\n:0 e\nfilter-failed\n", home, ex=ex, allow_pipes=True)
    assert ex.written("filter-failed") == MSG and result.message == MSG
    ex = Recorder(home, programs={"/bin/f": exits(2, b"garbage\n")})
    result, _ = go(":0 f\n| /bin/f\n", home, ex=ex, allow_pipes=True)  # without w: taken anyway
    assert result.message == b"garbage\n"


def test_capture_and_backquotes(home: Path) -> None:
    ex = Recorder(home, programs={"/bin/echo": lambda argv, m, env, c: (0, (" ".join(argv[1:]) + "\n\n").encode())})
    rc = ':0\nVAR=| /bin/echo one two\nB=`/bin/echo three`\nC="`/bin/echo four five`"\n:0\n"$VAR|$B|$C"\n'
    _, ex = go(rc, home, ex=ex, allow_pipes=True)
    assert ex.folders() == ["one two\n|three|four five"]  # capture strips one newline, ` ` all


def test_program_condition(home: Path) -> None:
    ex = Recorder(home, programs={"/bin/yes": exits(0), "/bin/no": exits(1)})
    _, ex = go(":0 c\n* ? /bin/yes\nyes\n:0 c\n* ! ? /bin/no\nnot-no\n:0\n* ? /bin/no\nno\n", home, ex=ex,
               allow_pipes=True)
    assert ex.folders() == ["yes", "not-no", "Mailbox"]
    header = ex.calls[0][2]
    assert header.startswith(FROM_) and b"Hi Alice" not in header  # the header is searched by default


# ---------------------------------------------------------------------------- blocks, includes, variables


def test_nested_blocks(home: Path) -> None:
    rc = ":0\n* ^Subject\n{\n  X=in\n  :0\n  * ^X-No\n  { :0\n    never\n  }\n  :0\n  $X-block\n}\n:0\nafter\n"
    _, ex = go(rc, home)
    assert ex.folders() == ["in-block"]


def test_clone_block(home: Path) -> None:
    rc = ":0 c\n{\n  :0 c\n  clone-copy\n  S=clone\n}\n:0\n${S:-parent}\n"
    result, ex = go(rc, home)
    assert ex.folders() == ["clone-copy", "clone", "parent"]
    assert any(a.startswith("clone: ") for a in result.actions)


def test_clone_w_waits_for_its_verdict(home: Path) -> None:
    ex = Recorder(home, fail={"Mailbox": OSError("full")})
    _, ex = go(":0 cw\n{ }\n:0 e\nclone-failed\n", home, ex=ex)
    assert ex.folders() == ["clone-failed"]


def test_includerc(home: Path) -> None:
    files = {home / "inc.rc": ":0\n* ^Subject\nincluded\n", home / "bad.rc": ":0 X\nx\n"}

    def read(path: Path) -> str:
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    result, ex = go("INCLUDERC=bad.rc\nINCLUDERC=missing.rc\nINCLUDERC=$HOME/inc.rc\n", home, read_file=read)
    assert ex.folders() == ["included"]
    assert "bad.rc" in result.errors[0] and "unknown flag" in result.errors[0]
    assert "missing.rc" in result.errors[1]


def test_default_rcfile_reader(home: Path) -> None:
    (home / "inc.rc").write_text(":0\n* ^Subject\nfrom-file\n")
    os.mkfifo(home / "fifo.rc")
    (home / "huge.rc").write_bytes(b"# " + b"x" * procmail.MAX_RCFILE)
    result, ex = go("INCLUDERC=fifo.rc\nINCLUDERC=huge.rc\nINCLUDERC=/dev/zero\nINCLUDERC=inc.rc\n", home)
    assert ex.folders() == ["from-file"]
    assert ["not a regular file" in e for e in result.errors] == [True, False, True]
    assert "larger than" in result.errors[1]


def test_include_loops_are_bounded(home: Path) -> None:
    result, ex = go("INCLUDERC=self.rc\n", home, read_file=lambda p: "INCLUDERC=self.rc\n")
    assert result.delivered and ex.folders() == ["Mailbox"] and "nested more than" in result.errors[0]
    result, ex = go("SWITCHRC=loop.rc\n", home, read_file=lambda p: "SWITCHRC=loop.rc\n")
    assert result.delivered and ex.folders() == ["Mailbox"] and "steps" in result.errors[-1]


def test_switchrc(home: Path) -> None:
    files = {home / "other.rc": ":0 c\nother\nSWITCHRC\n:0\nnever\n"}
    rc = "SWITCHRC=gone.rc\n:0 c\nstill\nSWITCHRC=other.rc\n:0\nnever-either\n"
    _, ex = go(rc, home, read_file=lambda p: files[p])
    assert ex.folders() == ["still", "other", "Mailbox"]


def test_clone_budget(home: Path) -> None:
    result, ex = go(":0 c\n{ }\n" * 6, home)  # 2**6 runs without a budget
    assert len(ex.folders()) == procmail.MAX_CLONES + 1
    assert any("clones" in e for e in result.errors)


def test_variable_expansion(home: Path) -> None:
    rc = ("A=${UNSET:-dflt}\nB=${EMPTY:-empty}\nEMPTY=\nC=${EMPTY-x}${EMPTY:-y}\nD=${A:+alt}${UNSET+no}\n"
          "E='$A'\nF=\"$A b\"\nG=a\\ b\n:0\n\"$A,$B,$C,$D,$E,$F,$G\"\n")
    _, ex = go(rc, home)
    assert ex.folders() == ["dflt,empty,y,alt,$A,dflt b,a b"]


def test_unquoted_expansion_splits_words(home: Path) -> None:
    result, ex = go('NAME="two words"\n:0 c\n$NAME\n:0\n"$NAME"\n', home)
    assert ex.folders() == ["two", "two words"]
    assert any("extra folder 'words' skipped" in a for a in result.actions)


def test_special_expansions(home: Path) -> None:
    _, ex = go(":0 c\nfirst\n:0\nafter-$-${LASTFOLDER}\n", home)
    assert ex.folders() == ["first", "after-firstfirst"]
    _, ex = go(":0\n$LOGNAME-$SENDER-$$\n", home)
    assert ex.folders() == [f"alice-bob@example.org-{os.getpid()}"]


def test_maildir_variable_moves_relative_folders(home: Path) -> None:
    (home / "Mail").mkdir()
    result, ex = go("MAILDIR=$HOME/Mail\n:0 c\nin-mail\nMAILDIR=nowhere\n:0\nstill-in-mail\n", home)
    assert ex.folders() == ["Mail/in-mail", "Mail/still-in-mail"]
    assert "couldn't chdir to 'nowhere'" in result.errors[0]


def test_missing_parent_directory_fails_as_in_procmail(home: Path) -> None:
    result, ex = go(":0\nno-such-dir/inbox\n:0\nno-such-dir/md/\n", home)
    assert ex.folders() == ["Mailbox"] and "no directory" in result.errors[0]


def test_unsupported_folder_types_fail(home: Path) -> None:
    (home / "dir").mkdir()
    result, ex = go(":0\nmh/.\n:0\ndir\n", home)
    assert ex.folders() == ["Mailbox"]
    assert "MH folders" in result.errors[0] and "is a directory" in result.errors[1]


def test_executor_errors_never_escape(home: Path) -> None:
    ex = Recorder(home, fail={"a": PermissionError("outside HOME"), "b": RuntimeError("bug"),
                              "Mailbox": MemoryError()})
    result, ex = go(":0 c\na\n:0 c\nb\n", home, ex=ex)
    assert not result.delivered and result.message == MSG
    assert [e.split(": ")[-1] for e in result.errors[:2]] == ["outside HOME", "bug"]


def test_executor_log_failures_are_ignored(home: Path) -> None:
    class Loud(Recorder):
        def log(self, line: str) -> None:
            raise OSError("log full")

    result, _ = go(":0\ninbox\n", home, ex=Loud(home))
    assert result.delivered


def test_logfile_inside_home(home: Path) -> None:
    result, _ = go('LOGFILE=$HOME/pm.log\nLOG="hello\n"\n:0\n* ^Subject\ninbox\n', home)
    log = (home / "pm.log").read_text()
    assert log.startswith("hello\nFrom bob@example.org  ")
    assert " Subject: Hello World\n" in log and "  Folder: inbox\t" in log


def test_logfile_outside_home_is_ignored(home: Path, tmp_path: Path) -> None:
    (home / "link").symlink_to(tmp_path)
    result, _ = go('LOGFILE=/tmp/../etc/pm.log\nLOGFILE=link/escape.log\nLOG="x"\n', home)
    assert not (tmp_path / "escape.log").exists()
    assert len([e for e in result.errors if "LOGFILE ignored" in e]) == 2


def test_message_keeps_its_own_from_line(home: Path) -> None:
    own = b"From someone@else  Mon Jan  1 00:00:00 2024\n" + MSG
    _, ex = go(":0\n* ^^From someone@else\nyes\n", home, message=own)
    assert ex.written("yes") == MSG


def test_null_sender_is_mailer_daemon(home: Path) -> None:
    assert matches("^^From MAILER-DAEMON  ", home, env={"SENDER": ""}, sender="")


def test_confine(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    assert procmail.confine(root / "sub" / "new-file", [root]) == root / "sub" / "new-file"
    with pytest.raises(PermissionError):
        procmail.confine(root / ".." / "x", [root])
    with pytest.raises(PermissionError):
        procmail.confine(root / "out" / "x", [root])
