"""The address-list lexer (``monomail.addrlist``): pure functions, no files, no sockets."""

from __future__ import annotations

import pytest

from monomail.addrlist import (
    MAX_TEXT,
    Address,
    AliasEntry,
    Backslashed,
    BadLine,
    File,
    Include,
    Malformed,
    Pipe,
    format_special,
    parse_aliases,
    parse_list,
    parse_special,
)
from monomail.settings import Discard, Refusal


def values(text: str) -> list[object]:
    return [item.value for item in parse_list(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # defect 6: a phrase is not a list of local names
        ("bob@remote.test, Carol Smith <carol@remote.test>",
         [Address("bob@remote.test"), Address("carol@remote.test")]),
        ('"Smith, Carol" <carol@remote.test>', [Address("carol@remote.test")]),
        ("alice (Alice Smith), (nobody) , carol", [Address("alice"), Address("carol")]),
        ("alice bob\ncarol", [Address("alice"), Address("bob"), Address("carol")]),  # old-style lists
        ('"x#y@example.net", alice # a comment, not an item', [Address("x#y@example.net"), Address("alice")]),
        ("x#y@example.net", [Address("x#y@example.net")]),
        ("# only a comment\n\n  , ,", []),
        ('"dave"', [Address("dave")]),
        ('"John Smith"', [Address("John Smith")]),  # one (bad) name, for the caller to refuse
        ("\\alice, \\Bob", [Backslashed("alice"), Backslashed("Bob")]),
        ('"|/usr/bin/procmail -m, -f-", |/bin/cat -u, "/var/log/a b"',
         [Pipe("/usr/bin/procmail -m, -f-"), Pipe("/bin/cat -u"), File("/var/log/a b")]),
        ("|/bin/sh -c (x)", [Pipe("/bin/sh -c (x)")]),
        (":include:/etc/mail/staff, :include: lists/x",
         [Include("/etc/mail/staff"), Include("lists/x")]),
        ('"unclosed, bob@remote.test\nalice', [Malformed("a quote is not closed"), Address("alice")]),
        ("alice (open comment\nbob", [Malformed("a comment ( ) is not closed"), Address("bob")]),
        ("Name <>, Name <a b>", [Malformed("not an address in < >")] * 2),
        # defect 7: a refusal is one item, never four users
        (":error:5.1.1 This user has left", [Refusal(550, "5.1.1", "This user has left")]),
        (":fail: Gone away, no forwarding address # old\nbob",
         [Refusal(550, "5.1.1", "Gone away, no forwarding address"), Address("bob")]),
        ('":fail: quoted, text", alice', [Refusal(550, "5.1.1", "quoted, text"), Address("alice")]),
        ("alice, :blackhole:", [Address("alice"), Discard()]),
        (":fail: 4.2.2 full", [Malformed(":fail: refuses for good: its status is 5.x.x (:defer: is for 4.x.x)")]),
    ],
)
def test_parse_list(text: str, expected: list[object]):
    assert values(text) == expected


def test_items_know_their_line_and_how_they_were_written():
    items = parse_list("a,\n\n  Bob Jones <bob@x.test> # c\n\"|cmd\"", first_line=10)
    assert [(i.raw, i.line) for i in items] == [("a", 10), ("Bob Jones <bob@x.test>", 12), ("|cmd", 13)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":fail:", Refusal(550, "5.1.1", "User unknown")),
        (":FAIL: This user has left", Refusal(550, "5.1.1", "This user has left")),
        (":fail: 5.1.6 Moved", Refusal(550, "5.1.6", "Moved")),
        (":fail: 551 5.1.6 Moved to <bob@example.test>", Refusal(551, "5.1.6", "Moved to <bob@example.test>")),
        (":defer:", Refusal(450, "4.2.1", "Try again later")),
        (":defer: 4.2.2 Mailbox full", Refusal(450, "4.2.2", "Mailbox full")),
        (":defer: 451 4.3.0 Local trouble", Refusal(451, "4.3.0", "Local trouble")),
        (":error:5.1.1 This user has left", Refusal(550, "5.1.1", "This user has left")),
        (":error: 4.2.1 later", Refusal(450, "4.2.1", "later")),
        ("error:5.1.1:550 User unknown", Refusal(550, "5.1.1", "User unknown")),
        ("error:4.2.1:450 Try later", Refusal(450, "4.2.1", "Try later")),
        ("error:nouser No such user here", Refusal(550, "5.1.1", "No such user here")),
        ("error:tempfail", Refusal(450, "4.0.0", "Try again later")),
        ("error:550 Go away", Refusal(550, "5.1.1", "Go away")),
        (":blackhole:", Discard()),
        ("alice", None),
        ("|/bin/cat", None),
    ],
)
def test_parse_special(text: str, expected: object):
    assert parse_special(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (":fail: 4.2.1 x", ":defer: is for 4.x.x"),
        (":defer: 5.1.1 x", ":fail: is for 5.x.x"),
        (":fail: 450 x", ":defer: is for 4.x.x"),
        ("error:5.1.1:450 x", "do not agree"),
        (":fail: 250 2.0.0 fine", "4xx or 5xx"),
    ],
)
def test_parse_special_refuses_what_makes_no_sense(text: str, reason: str):
    with pytest.raises(ValueError, match=reason.replace(".", r"\.")):
        parse_special(text)


def test_refusal_text_is_printable_ascii_and_short():
    smuggle = ":fail: gone\r\n250 2.0.0 OK\x00 caf\u00e9 " + "x" * 300
    lenient = parse_special(smuggle)
    assert isinstance(lenient, Refusal)
    assert lenient.text.startswith("gone 250 2.0.0 OK? caf? x")
    assert len(lenient.text) == MAX_TEXT and all(" " <= c <= "~" for c in lenient.text)
    for bad in (":fail: caf\u00e9", ":fail: a\x07b", ":fail: " + "x" * (MAX_TEXT + 1)):
        with pytest.raises(ValueError, match="printable ASCII"):
            parse_special(bad, strict=True)
    assert parse_special(":fail: tabs\tand  spaces", strict=True) == Refusal(550, "5.1.1", "tabs and spaces")
    with pytest.raises(ValueError, match="no text"):
        parse_special(":blackhole: x", strict=True)


@pytest.mark.parametrize("value", [Refusal(550, "5.1.1", "User unknown"), Refusal(551, "5.1.6", "Moved"),
                                   Refusal(450, "4.2.1", "later"), Refusal(421, "4.3.2", "x"), Discard()])
def test_format_special_reads_back_the_same(value: Refusal | Discard):
    assert parse_special(format_special(value), strict=True) == value


def test_parse_aliases_continuations_comments_and_bad_lines():
    text = ("# aliases\n"
            "  orphan\n"
            "admin:\talice,\n"
            "\tbob@example.net,\n"
            "# a comment between\n"
            "    # an indented comment\n"
            "\tCarol\n"
            "olduser: :error:5.1.1 This user has left\n"
            "Bad Name: alice\n"
            "nocolon\n")
    entries = parse_aliases(text)
    assert entries[0] == BadLine(2, "orphan", "continuation line with no alias before it")
    admin = entries[1]
    assert isinstance(admin, AliasEntry) and (admin.name, admin.line) == ("admin", 3)
    assert [(i.value, i.line) for i in admin.items] == [
        (Address("alice"), 3), (Address("bob@example.net"), 4), (Address("Carol"), 7)]
    olduser = entries[2]
    assert isinstance(olduser, AliasEntry)
    assert [i.value for i in olduser.items] == [Refusal(550, "5.1.1", "This user has left")]
    assert [(e.line, e.text) for e in entries[3:] if isinstance(e, BadLine)] == [(9, "Bad Name: alice"),
                                                                                (10, "nocolon")]
