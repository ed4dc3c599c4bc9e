"""Delivery status notifications: built, then parsed back with the stdlib; no sockets."""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from email.utils import parsedate_to_datetime

import pytest

from monomail.dsn import MAX_HEADERS, SUBJECT_DELAYED, SUBJECT_FAILED, RecipientReport, build_report

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
ORIGINAL = (
    b"Received: from client.example.test ([192.0.2.7])\n"
    b"\tby mx.example.test (monomail) with ESMTP id Q1; Tue, 14 Nov 2023 22:13:20 +0000\n"
    b"From: Alice <alice@example.test>\n"
    b"To: bob@remote.test\n"
    b"Subject: Lunch on Friday?\n"
    b"\n"
    b"Secret body text, not to be returned.\n"
)
FAILED = RecipientReport(
    "bob@remote.test", "failed", "5.1.1", "550 5.1.1 No such user", "mx1.remote.test", last_attempt=NOW - 10
)
DELAYED = RecipientReport(
    "carol@slow.test", "delayed", "4.4.1", "451 4.4.1 Connection timed out", "mx.slow.test",
    last_attempt=NOW - 5, will_retry_until=ARRIVAL + 5 * 86400,
)


def make(reports=(FAILED,), *, sender="alice@example.test", original=ORIGINAL, **kw) -> bytes:
    args = dict(reporting_mta="mx.example.test", sender=sender, queue_id="Q1", arrival=ARRIVAL, now=NOW)
    args.update(kw)
    return build_report(reports=list(reports), original=original, **args)


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data)


def unfold(value) -> str:
    return " ".join(str(value).split())


def parts(msg: Message) -> list[Message]:
    return msg.get_payload()


def status_blocks(msg: Message) -> list[Message]:
    return parts(msg)[1].get_payload()


def text_of(part: Message) -> str:
    return part.get_payload(decode=True).decode("utf-8")


def all_header_names(msg: Message) -> set[str]:
    names = {k.lower() for k in msg}
    for part in msg.walk():
        names |= {k.lower() for k in part}
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload():
                names |= {k.lower() for k in block}
    return names


def assert_wire_safe(data: bytes) -> None:
    assert b"\r" not in data
    assert all(len(line) <= 998 for line in data.split(b"\n"))


# -- structure -------------------------------------------------------------------------


def test_multipart_report_with_three_parts_in_order():
    msg = parse(make())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["MIME-Version"] == "1.0"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    assert parts(msg)[0].get_content_charset() == "utf-8"


def test_top_level_headers():
    msg = parse(make())
    assert msg["To"] == "alice@example.test"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@mx.example.test>")
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["X-Original-Queue-Id"] == "Q1"


def test_message_ids_are_fresh():
    assert parse(make())["Message-ID"] != parse(make())["Message-ID"]


def test_per_message_block():
    (per_message, *_) = status_blocks(parse(make()))
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL


def test_per_recipient_blocks():
    _, failed, delayed = status_blocks(parse(make([FAILED, DELAYED])))
    assert failed["Final-Recipient"] == "rfc822; bob@remote.test"
    assert failed["Action"] == "failed"
    assert failed["Status"] == "5.1.1"
    assert failed["Remote-MTA"] == "dns; mx1.remote.test"
    assert failed["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert parsedate_to_datetime(failed["Last-Attempt-Date"]).timestamp() == NOW - 10
    assert failed["Will-Retry-Until"] is None  # RFC 3464 §2.3.8: only in "delayed" DSNs

    assert delayed["Final-Recipient"] == "rfc822; carol@slow.test"
    assert delayed["Action"] == "delayed"
    assert delayed["Status"] == "4.4.1"
    assert delayed["Diagnostic-Code"] == "smtp; 451 4.4.1 Connection timed out"
    assert parsedate_to_datetime(delayed["Will-Retry-Until"]).timestamp() == ARRIVAL + 5 * 86400


def test_optional_fields_are_left_out():
    bare = RecipientReport("dave@remote.test", "failed", "5.0.0")
    _, block = status_blocks(parse(make([bare])))
    assert block["Final-Recipient"] == "rfc822; dave@remote.test"
    for name in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until"):
        assert block[name] is None


def test_bad_status_falls_back_to_class_default():
    odd = [RecipientReport("a@x.test", "failed", ""), RecipientReport("b@x.test", "delayed", "4.x\n")]
    _, failed, delayed = status_blocks(parse(make(odd)))
    assert failed["Status"] == "5.0.0"
    assert delayed["Status"] == "4.0.0"


@pytest.mark.parametrize(
    ("reports", "subject"),
    [([FAILED], SUBJECT_FAILED), ([DELAYED], SUBJECT_DELAYED), ([DELAYED, FAILED], SUBJECT_FAILED)],
    ids=["failed", "delayed", "mixed"],
)
def test_subject(reports, subject):
    assert parse(make(reports))["Subject"] == subject


def test_human_readable_part():
    text = text_of(parts(parse(make([FAILED, DELAYED])))[0])
    assert "<bob@remote.test>: 550 5.1.1 No such user" in text
    assert "<carol@slow.test>: 451 4.4.1 Connection timed out" in text
    assert "will keep trying until" in text
    assert "Q1" in text
    assert "Traceback" not in text


def test_original_headers_part_has_headers_not_body():
    part = parts(parse(make()))[2]
    text = text_of(part)
    assert "Subject: Lunch on Friday?" in text
    assert "Secret body text" not in text
    assert parse(text.encode())["Subject"] == "Lunch on Friday?"


# -- odd input -------------------------------------------------------------------------


def test_utf8_in_original_headers_and_diagnostic():
    original = "Subject: Grüße aus Köln\nFrom: jürgen@example.test\n\nKörper\n".encode() + b"X-Bad: \xff\xfe\n"
    report = RecipientReport("bob@remote.test", "failed", "5.1.1", "550 5.1.1 Benutzer »bob« unbekannt")
    data = make([report], original=original)
    assert data.isascii()  # all parts 7-bit: no 8BITMIME needed on the way back
    assert_wire_safe(data)
    msg = parse(data)
    text, status, headers = parts(msg)
    assert "Benutzer »bob« unbekannt" in text_of(text)
    diag = status.get_payload()[1]["Diagnostic-Code"]
    assert diag.isascii() and diag.startswith("smtp; 550 5.1.1 Benutzer \\x{BB}bob\\x{AB}")
    head = text_of(headers)
    assert "Subject: Grüße aus Köln" in head and "Körper" not in head


def test_invalid_utf8_in_headers_is_replaced():
    original = b"Subject: caf\xe9 \xff\x00\rend\nX-Other: 1\n\nbody\n"
    msg = parse(make(original=original))
    head = text_of(parts(msg)[2])
    assert "Subject: caf\ufffd \ufffd\ufffd\ufffdend" in head
    assert "X-Other: 1" in head


def test_utf8_addresses():
    report = RecipientReport("jürgen+x@bücher.test", "failed", "5.1.1", "550 no")
    data = make([report], sender="sören@example.test")
    assert_wire_safe(data)
    assert b"\nTo: s\xc3\xb6ren@example.test\n" in data  # RFC 6532 raw UTF-8, never an encoded word
    _, block = status_blocks(parse(data))
    assert block["Final-Recipient"] == "utf-8; j\\x{FC}rgen\\x{2B}x@b\\x{FC}cher.test"  # RFC 6533 xtext
    assert "<jürgen+x@bücher.test>" in text_of(parts(parse(data))[0])


@pytest.mark.parametrize(
    "original",
    [b"", b"\n\nbody only\n", b"Subject: no body and no newline", b"\x00\xff\r\r\n\n", b"Subject: x\r\n\r\nbody\r\n"],
    ids=["empty", "no-headers", "headers-only", "junk", "crlf"],
)
def test_odd_originals_do_not_raise(original):
    data = make(original=original)
    assert_wire_safe(data)
    assert [p.get_content_type() for p in parts(parse(data))][2] == "text/rfc822-headers"


def test_huge_header_section_is_cut_at_a_line_end():
    original = b"".join(b"X-Filler-%05d: %s\n" % (i, b"y" * 60) for i in range(2000)) + b"\nbody\n"
    head = text_of(parts(parse(make(original=original)))[2])
    assert len(head.encode()) <= MAX_HEADERS
    assert head.startswith("X-Filler-00000:") and head.endswith("y\n")


def test_crlf_injection_in_diagnostic_and_recipient():
    reports = [
        RecipientReport("bob@remote.test\r\nX-Injected-Rcpt: 1", "failed", "5.1.1", "550 no\r\nX-Injected-Diag: 1"),
        RecipientReport("eve@remote.test", "failed", "5.1.1", "550 =?utf-8?q?x=0D=0AX-Injected-Ew:_1?= " + "z " * 60),
        RecipientReport("mallory@remote.test", "delayed", "4.0.0", "451 a\nb\x00c\x85d\u2028e", "mx\n.evil\r.test"),
    ]
    data = make(reports, sender="alice@example.test\r\nBcc: victim@example.test", queue_id="Q1\nX-Injected-Qid: 1")
    assert_wire_safe(data)
    lines = data.split(b"\n")
    assert not any(line.lower().startswith((b"x-injected", b"bcc")) for line in lines)
    msg = parse(data)
    assert not {n for n in all_header_names(msg) if n.startswith("x-injected") or n == "bcc"}
    _, first, second, third = status_blocks(msg)
    assert first["Final-Recipient"] == "rfc822; bob@remote.test X-Injected-Rcpt: 1"
    assert first["Diagnostic-Code"] == "smtp; 550 no X-Injected-Diag: 1"
    assert unfold(second["Diagnostic-Code"]).startswith("smtp; 550 =?utf-8?q?x=0D=0AX-Injected-Ew:_1?= z z")
    assert third["Diagnostic-Code"] == "smtp; 451 a b c d e"
    assert third["Remote-MTA"] == "dns; mx_.evil_.test"
    # Parsing the encoded word the modern way still yields no extra header.
    modern = email.message_from_bytes(data, policy=email.policy.default)
    assert modern["Bcc"] is None and modern["To"].addresses[0].username.startswith("alice")


def test_lf_only_and_short_lines_with_long_values():
    long_word = "x" * 5000
    reports = [
        RecipientReport("bob@remote.test", "failed", "5.1.1", f"550 {long_word}", "h" * 400),
        RecipientReport("carol@slow.test", "delayed", "4.4.1", "451 " + "word " * 1000),
    ]
    original = b"Subject: long\nX-Long: " + b"a" * 3000 + b"\n\nbody\n"
    data = make(reports, original=original)
    assert_wire_safe(data)
    msg = parse(data)
    assert "a" * 3000 in text_of(parts(msg)[2])  # quoted-printable carries the long line intact
    _, failed, delayed = status_blocks(msg)
    assert unfold(failed["Diagnostic-Code"]).startswith("smtp; 550 xxx")
    assert unfold(delayed["Diagnostic-Code"]).startswith("smtp; 451 word word")


def test_many_recipients():
    reports = [RecipientReport(f"user{i}@remote.test", "failed", "5.1.1", "550 no") for i in range(200)]
    msg = parse(make(reports))
    blocks = status_blocks(msg)
    assert len(blocks) == 201
    assert [b["Final-Recipient"] for b in blocks[1:]] == [f"rfc822; user{i}@remote.test" for i in range(200)]


# -- caller mistakes -------------------------------------------------------------------


def test_null_sender_is_refused():
    with pytest.raises(ValueError, match="null sender"):
        make(sender="")


def test_no_reports_is_refused():
    with pytest.raises(ValueError):
        make([])


def test_unknown_action_is_refused():
    with pytest.raises(ValueError, match="action"):
        make([RecipientReport("a@x.test", "delivered", "2.0.0")])
