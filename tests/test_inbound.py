"""Issue 10, checking inbound mail: SPF, DKIM and DMARC on mail from outside, the
Authentication-Results field, DMARC policy (reject at DATA, quarantine into Junk), and
forged results removed.

Real sockets: a monomail on 127.0.0.1 whose only trusted network is 127.0.0.1/32, clients
on other loopback addresses (127.0.0.5, 127.0.0.6), the test DNS server of tests/peers.py
as ``dns.nameservers``, DKIM signatures made by Perl's Mail::DKIM (tests/perl/dkim_sign.pl)
with a key made by openssl here, mail read back with the stdlib ``mailbox`` module.
"""

from __future__ import annotations

import base64
import logging
import mailbox
import re
import shutil
import smtplib
import subprocess
import sys
import time
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, wait_until, write_config

pytestmark = pytest.mark.timeout(90)

HERE = Path(__file__).resolve().parent
HOST = "mx.example.test"
OUTSIDE = "127.0.0.5"  # an SPF-permitted client of sender.test
STRANGER = "127.0.0.6"  # permitted by nobody
PASSWORD = "correct horse battery"


def start(serve: Any, dns: Any, **overrides: Any) -> Any:
    checks = overrides.pop("checks", {})
    server = overrides.pop("server", {})
    return serve(dns={"nameservers": [dns.address], "timeout": "1s"},
                 server={"trusted_networks": ["127.0.0.1/32"], **server},
                 checks={"spf": True, "dkim": True, "dmarc": "enforce", **checks}, **overrides)


def message(sender: str = "someone@sender.test", subject: str = "hello", extra: str = "",
            to: str = "alice@example.test") -> bytes:
    text = (f"{extra}From: Someone <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Tue, 01 Dec 2026 11:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@sender.test>\r\n"
            f"\r\nThe body.\r\n")
    return text.encode()


def send(server: Any, data: bytes, *, sender: str = "someone@sender.test", rcpts: tuple[str, ...] = (
        "alice@example.test",), source: str = OUTSIDE, helo: str = "client.sender.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(source, 0), timeout=30, local_hostname=helo) as s:
        s.sendmail(sender, list(rcpts), data)


def inbox(server: Any, user: str = "alice", folder: str = "") -> list[Message]:
    path = server.config.local.mail_dir / user / folder
    if not (path / "new").exists():
        return []
    return [message_from_bytes(m.as_bytes()) for m in mailbox.Maildir(path, factory=None, create=False)]


def mbox(server: Any, user: str = "bob") -> list[Message]:
    path = server.config.local.mail_dir / user
    return [message_from_bytes(m.as_bytes()) for m in mailbox.mbox(path, create=False)] if path.exists() else []


def ours(msg: Message) -> list[str]:
    """Our Authentication-Results values, unfolded."""
    values = [re.sub(r"\s+", " ", str(v)) for v in msg.get_all("Authentication-Results", [])]
    return [v for v in values if v.split(";")[0].strip().lower() == HOST]


def one_result(server: Any, user: str = "alice") -> str:
    box = inbox(server, user)
    assert len(box) == 1
    results = ours(box[0])
    assert len(results) == 1, results
    return results[0]


def spool_entries(server: Any) -> list[Path]:
    spool = server.config.server.spool_dir
    return [p for p in spool.rglob("*") if p.suffix in (".msg", ".json")]


# -- SPF -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"])
def test_spf_result_is_in_authentication_results(serve, dns, case):
    dns.txt("pass.test", f"v=spf1 ip4:{OUTSIDE} -all")
    dns.txt("fail.test", f"v=spf1 ip4:{STRANGER} -all")
    dns.txt("softfail.test", "v=spf1 mx ~all")
    dns.mx("softfail.test", (10, "mx.softfail.test"))
    dns.a("mx.softfail.test", "192.0.2.1")
    dns.txt("neutral.test", "v=spf1 ?all")
    dns.a("none.test", "192.0.2.2")  # exists, publishes no SPF
    dns.drop("temperror.test")  # the name server never answers for it
    dns.txt("permerror.test", "v=spf1 ip4:192.0.2.0/24 frobnicate -all")
    server = start(serve, dns)
    t0 = time.monotonic()
    send(server, message(f"x@{case}.test"), sender=f"x@{case}.test")
    took = time.monotonic() - t0
    assert f"spf={case} smtp.mailfrom={case}.test" in one_result(server)
    assert (f"{case}.test", "TXT") in dns.queries  # asked through monomail's resolver, at [dns]
    assert took < 15


def test_null_sender_is_checked_by_its_helo_name(serve, dns):
    dns.txt("relay.helo.test", f"v=spf1 ip4:{OUTSIDE} -all")
    server = start(serve, dns)
    send(server, message("mailer-daemon@helo.test"), sender="", helo="relay.helo.test")
    assert "spf=pass smtp.helo=relay.helo.test" in one_result(server)


def test_spf_on_and_dkim_dmarc_off_give_just_spf(serve, dns):
    dns.txt("sender.test", f"v=spf1 ip4:{OUTSIDE} -all")
    server = start(serve, dns, checks={"dkim": False, "dmarc": "off"})
    send(server, message())
    result = one_result(server)
    assert result == f"{HOST}; spf=pass smtp.mailfrom=sender.test"


# -- DKIM, signed by Perl's Mail::DKIM ---------------------------------------------------


@pytest.fixture
def perl_signer(tmp_path, dns):
    """``sign(data) -> signed``: Mail::DKIM with an RSA key made by openssl, its public key
    published at sel._domainkey.signer.test in the test DNS."""
    if shutil.which("perl") is None or subprocess.run(["perl", "-MMail::DKIM::Signer", "-e", "1"]).returncode:
        pytest.skip("Perl's Mail::DKIM (libmail-dkim-perl) is not installed")
    key = tmp_path / "signer.pem"
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(key), "2048"], check=True,
                   capture_output=True, timeout=60)
    der = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True, timeout=60).stdout
    dns.txt("sel._domainkey.signer.test", "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())

    def sign(data: bytes) -> bytes:
        done = subprocess.run(["perl", str(HERE / "perl" / "dkim_sign.pl"), str(key), "signer.test", "sel"],
                              input=data, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"DKIM-Signature:")
        return done.stdout

    return sign


def test_signature_by_mail_dkim_verifies_as_pass(serve, dns, perl_signer):
    server = start(serve, dns)
    send(server, perl_signer(message("news@signer.test")), sender="news@signer.test")
    result = one_result(server)
    assert re.search(r"dkim=pass header\.d=signer\.test header\.s=sel header\.b=\"?[A-Za-z0-9+/]{8}", result), result
    assert "spf=none smtp.mailfrom=signer.test" in result
    assert ("sel._domainkey.signer.test", "TXT") in dns.queries


def test_signature_altered_in_transit_verifies_as_fail(serve, dns, perl_signer):
    server = start(serve, dns)
    signed = perl_signer(message("news@signer.test"))
    altered = signed.replace(b"The body.", b"The body, changed on the way.")
    send(server, altered, sender="news@signer.test")
    result = one_result(server)
    assert "dkim=fail header.d=signer.test header.s=sel" in result, result


def test_unsigned_mail_is_dkim_none(serve, dns):
    server = start(serve, dns)
    send(server, message())
    assert "dkim=none" in one_result(server)


def test_only_the_first_signatures_are_verified(serve, dns):
    # Each signature costs a key lookup, a parse and a body hash, and a result in our field:
    # a message with many may not buy that many (RFC 6376 §6.1 lets a verifier limit them).
    sigs = "".join(f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=many{i}.test; s=s; h=from;\r\n"
                   f"\tbh=AAAA; b=AAAA{i}\r\n" for i in range(30))
    server = start(serve, dns)
    send(server, message(extra=sigs))
    result = one_result(server)
    assert result.count("dkim=") == 8, result
    assert "header.d=many0.test" in result and "header.d=many7.test" in result
    assert "header.d=many8.test" not in result


# -- DMARC ----------------------------------------------------------------------------


def test_dmarc_reject_is_refused_at_data_under_enforce(serve, dns, caplog):
    caplog.set_level(logging.INFO, logger="monomail.smtp")
    dns.txt("bank.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    server = start(serve, dns)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, message("security@bank.test"), sender="security@bank.test", source=STRANGER)
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1 ")
    assert b"bank.test" not in refused.value.smtp_error  # generic text; the cause is in the log
    time.sleep(0.3)
    assert inbox(server) == []  # nothing delivered
    assert spool_entries(server) == []  # nothing queued, nothing bounced
    assert any("refused DATA" in r.getMessage() and "dmarc=fail" in r.getMessage() for r in caplog.records)


def test_dmarc_reject_in_a_subdomain_follows_sp(serve, dns):
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject; sp=none")
    server = start(serve, dns)
    send(server, message("x@mail.bank.test"), sender="x@mail.bank.test", source=STRANGER)
    assert "dmarc=fail (p=none) header.from=mail.bank.test" in one_result(server)


def test_dmarc_reject_is_delivered_with_fail_under_monitor(serve, dns):
    dns.txt("bank.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    server = start(serve, dns, checks={"dmarc": "monitor"})
    send(server, message("security@bank.test"), sender="security@bank.test", source=STRANGER)
    result = one_result(server)
    assert "spf=fail smtp.mailfrom=bank.test" in result
    assert "dmarc=fail (p=reject) header.from=bank.test" in result


def test_dmarc_off_skips_dmarc(serve, dns):
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    server = start(serve, dns, checks={"dmarc": "off"})
    send(server, message("security@bank.test"), sender="security@bank.test", source=STRANGER)
    assert "dmarc=" not in one_result(server)
    assert ("_dmarc.bank.test", "TXT") not in dns.queries


def test_aligned_spf_pass_passes_dmarc(serve, dns):
    dns.txt("bounces.bank.test", f"v=spf1 ip4:{OUTSIDE} -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    server = start(serve, dns)
    send(server, message("security@bank.test"), sender="b-123@bounces.bank.test")  # relaxed alignment
    result = one_result(server)
    assert "spf=pass smtp.mailfrom=bounces.bank.test" in result
    assert "dmarc=pass (p=reject) header.from=bank.test" in result


def test_strict_spf_alignment_needs_the_same_name(serve, dns):
    dns.txt("bounces.bank.test", f"v=spf1 ip4:{OUTSIDE} -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=quarantine; aspf=s")
    server = start(serve, dns)
    send(server, message("security@bank.test"), sender="b-123@bounces.bank.test")
    assert inbox(server) == []
    [junk] = inbox(server, folder=".Junk")
    assert "dmarc=fail (p=quarantine) header.from=bank.test" in ours(junk)[0]


def test_aligned_dkim_pass_passes_dmarc_reject(serve, dns, perl_signer):
    dns.txt("_dmarc.signer.test", "v=DMARC1; p=reject")
    server = start(serve, dns)
    send(server, perl_signer(message("news@signer.test")), sender="bounce@elsewhere.test", source=STRANGER)
    assert "dmarc=pass (p=reject) header.from=signer.test" in one_result(server)


def test_dmarc_reject_with_altered_signature_is_refused(serve, dns, perl_signer):
    dns.txt("_dmarc.signer.test", "v=DMARC1; p=reject")
    server = start(serve, dns)
    altered = perl_signer(message("news@signer.test")).replace(b"The body.", b"Changed.")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, altered, sender="news@signer.test", source=STRANGER)
    assert (refused.value.smtp_code, refused.value.smtp_error[:6]) == (550, b"5.7.1 ")


def test_dns_timeout_is_temperror_and_never_a_rejection(serve, dns):
    dns.drop("slow.test")  # SPF of the MAIL FROM (and From) domain times out
    dns.txt("_dmarc.slow.test", "v=DMARC1; p=reject")
    server = start(serve, dns)
    send(server, message("x@slow.test"), sender="x@slow.test", source=STRANGER)
    result = one_result(server)
    assert "spf=temperror smtp.mailfrom=slow.test" in result
    assert "dmarc=temperror (p=reject) header.from=slow.test" in result


def test_dmarc_policy_lookup_timeout_is_temperror(serve, dns):
    dns.drop("_dmarc.bank.test")
    server = start(serve, dns)
    send(server, message("security@bank.test"), sender="security@bank.test", source=STRANGER)
    assert "dmarc=temperror header.from=bank.test" in one_result(server)


def test_quarantine_goes_to_junk_for_maildir_and_is_flagged_for_mbox(serve, dns):
    dns.txt("_dmarc.shady.test", "v=DMARC1; p=quarantine")
    server = start(serve, dns)
    # The message says it is not spam; monomail's verdict is what counts.
    data = message("x@shady.test", extra="X-Spam-Flag: NO\r\n", to="alice@example.test, bob@example.test")
    send(server, data, sender="x@shady.test", rcpts=("alice@example.test", "bob@example.test"), source=STRANGER)
    assert inbox(server) == []
    assert sorted(p.name for p in (server.config.local.mail_dir / "alice").iterdir()) == [".Junk", "cur", "new", "tmp"]
    [junk] = inbox(server, folder=".Junk")
    assert junk.get_all("X-Spam-Flag") == ["YES"]
    assert "dmarc=fail (p=quarantine) header.from=shady.test" in ours(junk)[0]
    assert sorted(p.name for p in (server.config.local.mail_dir / "alice" / ".Junk").iterdir()) == ["cur", "new", "tmp"]
    [flagged] = mbox(server)
    assert flagged.get_all("X-Spam-Flag") == ["YES"]
    assert flagged["Subject"] == "hello"


def test_outsiders_spam_flag_is_removed_and_cannot_quarantine(serve, dns):
    dns.txt("sender.test", f"v=spf1 ip4:{OUTSIDE} -all")
    server = start(serve, dns)
    send(server, message(extra="X-Spam-Flag: YES\r\n"))
    [msg] = inbox(server)
    assert msg.get_all("X-Spam-Flag") is None
    assert inbox(server, folder=".Junk") == []


def test_quarantine_without_enforce_is_delivered_to_the_inbox(serve, dns):
    dns.txt("_dmarc.shady.test", "v=DMARC1; p=quarantine")
    server = start(serve, dns, checks={"dmarc": "monitor"})
    send(server, message("x@shady.test"), sender="x@shady.test", source=STRANGER)
    [msg] = inbox(server)
    assert msg.get_all("X-Spam-Flag") is None
    assert "dmarc=fail (p=quarantine)" in ours(msg)[0]


# -- forged Authentication-Results -----------------------------------------------------


def test_forged_results_claiming_our_name_are_removed(serve, dns):
    dns.txt("sender.test", f"v=spf1 ip4:{STRANGER} -all")
    server = start(serve, dns)
    forged = ("Authentication-Results: MX.Example.Test; spf=pass smtp.mailfrom=sender.test;\r\n"
              "\tdkim=pass header.d=sender.test\r\n"
              "Authentication-Results: (our own, honest) mx.example.test; dmarc=pass header.from=sender.test\r\n"
              "Authentication-Results: other.test; spf=pass smtp.mailfrom=sender.test\r\n")
    send(server, message(extra=forged), source=OUTSIDE)
    [msg] = inbox(server)
    assert ours(msg) == [f"{HOST}; spf=fail smtp.mailfrom=sender.test; dkim=none; dmarc=none header.from=sender.test"]
    values = [re.sub(r"\s+", " ", v) for v in msg.get_all("Authentication-Results")]
    assert "other.test; spf=pass smtp.mailfrom=sender.test" in values  # another server's: kept
    assert len(values) == 2


# -- who is not checked ------------------------------------------------------------------


def test_mail_from_trusted_networks_is_not_checked(serve, dns):
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    server = start(serve, dns)
    forged = "Authentication-Results: other.test; spf=pass\r\n"
    send(server, message("security@bank.test", extra=forged), sender="security@bank.test", source="127.0.0.1")
    [msg] = inbox(server)
    assert ours(msg) == []
    assert msg.get_all("Authentication-Results") == ["other.test; spf=pass"]
    assert dns.queries == []  # nothing was looked up


def submit(serve: Any, dns: Any, tmp_path: Path, data: bytes) -> Any:
    """A monomail with a submission port; ``data`` sent there by alice, authenticated,
    from outside the trusted networks, to carol."""
    from peers import self_signed_cert

    made = self_signed_cert(tmp_path / "tls")
    if made is None:
        pytest.skip("cannot make a certificate")
    cert, key = made
    overrides: dict[str, Any] = {"tls": {"cert": cert, "key": key}, "submission": {"listen": ["127.0.0.1:0"]},
                                 "server": {"trusted_networks": ["127.0.0.1/32"]}}
    write_config(tmp_path, **overrides)
    done = subprocess.run([sys.executable, "-m", "monomail", "passwd", "alice", "-c", str(tmp_path / "monomail.toml")],
                          input=PASSWORD, capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    server = start(serve, dns, tls=overrides["tls"], submission=overrides["submission"])
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    port = server.app.server.port("submission")
    with smtplib.SMTP("127.0.0.1", port, source_address=(OUTSIDE, 0), timeout=30) as s:
        s.starttls(context=ctx)
        s.login("alice", PASSWORD)
        s.sendmail("alice@example.test", ["carol@example.test"], data)
    return server


def test_authenticated_submission_is_not_checked(serve, dns, tmp_path):
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    server = submit(serve, dns, tmp_path, message("alice@example.test", to="carol@example.test"))
    [msg] = inbox(server, "carol")
    assert ours(msg) == []
    assert not any(name.endswith("example.test") and rdtype == "TXT" for name, rdtype in dns.queries)


def test_submitted_results_claiming_our_name_are_removed(serve, dns, tmp_path):
    # A user may not hand another (or, through a forward or list, the world under our ARC
    # seal) results that monomail never found.
    forged = ("Authentication-Results: mx.example.test; dkim=pass header.d=bank.test;\r\n"
              "\tdmarc=pass header.from=bank.test\r\n"
              "Authentication-Results: other.test; spf=pass smtp.mailfrom=sender.test\r\n")
    server = submit(serve, dns, tmp_path, message("alice@example.test", to="carol@example.test", extra=forged))
    [msg] = inbox(server, "carol")
    assert ours(msg) == []
    assert [re.sub(r"\s+", " ", v) for v in msg.get_all("Authentication-Results")] == [
        "other.test; spf=pass smtp.mailfrom=sender.test"]


def test_a_quarantined_list_post_stays_quarantined_for_local_members(serve, dns):
    dns.txt("_dmarc.shady.test", "v=DMARC1; p=quarantine")
    server = start(serve, dns, lists={"dev": {"address": "dev@example.test", "members": ["alice", "carol"],
                                              "policy": "open"}})
    send(server, message("x@shady.test", to="dev@example.test"), sender="x@shady.test",
         rcpts=("dev@example.test",), source=STRANGER)
    wait_until(lambda: len(inbox(server, "carol", ".Junk")) == 1 and len(inbox(server, "alice", ".Junk")) == 1)
    assert inbox(server, "alice") == [] and inbox(server, "carol") == []
    [post] = inbox(server, "carol", ".Junk")
    assert post.get_all("X-Spam-Flag") == ["YES"] and post["List-Id"]


def test_too_many_from_domains_cannot_hide_one_whose_policy_rejects(serve, dns):
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    server = start(serve, dns)
    many = "a@x1.test, a@x2.test, a@x3.test, a@x4.test, CEO <ceo@bank.test>"
    data = message("x@x1.test").replace(b"From: Someone <x@x1.test>", f"From: {many}".encode())
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, data, sender="x@x1.test", source=STRANGER)
    assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1")
    assert inbox(server) == []
