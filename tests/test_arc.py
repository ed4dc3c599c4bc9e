"""ARC (RFC 8617): forwards and list posts of mail that came in from outside are sealed.

A message arrives from an untrusted client (127.0.0.1 is not in ``trusted_networks``
here) for a local user with a ``[forward]`` rule and for an open list, both of which
send it on to a peer on 127.0.0.2. monomail seals the Authentication-Results it added
on arrival (authserv-id = our hostname) in an ARC set; Perl's Mail::DKIM::ARC::Verifier
checks the chain against the keys in the loopback DNS server. The test message also
carries an ``Authentication-Results: mx.example.test; ...`` field of its own: until the
inbound checks add theirs, it stands for them (once they do, they replace it, and the
tests hold the same).
"""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest
from conftest import relay
from test_dkim import keys, mail_dkim, needs_mail_dkim, signatures, tag  # noqa: F401 (keys: a fixture)

PERL = Path(__file__).resolve().parent / "perl"
MSG = (b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=poster@elsewhere.test\r\n"
       b"From: Poster <poster@elsewhere.test>\r\nTo: bob@example.test\r\nSubject: please pass this on\r\n"
       b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <2@elsewhere.test>\r\n\r\nforward me\r\n")
UNTRUSTED = {"trusted_networks": ["192.0.2.0/24"]}

pytestmark = needs_mail_dkim


@pytest.fixture
def world(dns, port, peers, keys):  # noqa: F811
    dns.mx("remote.test", (10, "mx.peer.test"))
    dns.a("mx.peer.test", "127.0.0.2")
    keys.publish(dns)
    return peers("127.0.0.2", port)


def arc_verify(message: bytes, dns) -> str:
    p = subprocess.run(["perl", str(PERL / "arc_verify.pl"), dns.host, str(dns.port)], input=message,
                       capture_output=True, timeout=30)
    assert p.stdout, p.stderr.decode()
    return p.stdout.decode().strip()


def send(server, rcpt: str, data: bytes = MSG, sender: str = "poster@elsewhere.test") -> int:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("mail.elsewhere.test")
        assert s.mail(sender)[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        return s.data(data)[0]


def start(serve, dns, port, keys, **overrides):  # noqa: F811
    return relay(serve, dns, port, server=overrides.pop("server", UNTRUSTED), dkim=keys.config(),
                 forward={"bob": {"to": ["bob@remote.test"]}},
                 lists={"dev": {"address": "dev@example.test", "members": ["carol@remote.test"], "policy": "open"}},
                 **overrides)


def arc_fields(message: bytes) -> list[str]:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    return [line.split(":", 1)[0] for line in head.split("\r\n") if line.lower().startswith("arc-")]


def test_forward_and_list_post_of_mail_from_outside_carry_an_arc_set_that_verifies(serve, dns, port, world,
                                                                                     keys):  # noqa: F811
    server = start(serve, dns, port, keys)
    assert send(server, "bob@example.test") == 250
    assert send(server, "dev@example.test") == 250
    world.wait_for(2)
    by_rcpt = {r.rcpt_tos[0]: r for r in world.received}
    for got in (by_rcpt["bob@remote.test"], by_rcpt["carol@remote.test"]):
        assert arc_fields(got.data) == ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]
        assert b"ARC-Authentication-Results: i=1; mx.example.test;" in got.data
        assert b"cv=none" in got.data and b"d=example.test" in got.data
        result = arc_verify(got.data, dns)
        assert result.startswith("pass"), result
        # DKIM-signed for our domain as well (the envelope sender's: the From is foreign)
        assert [tag(s, "d") for s in signatures(got.data)] == ["example.test", "example.test"]
        assert mail_dkim(got.data, dns)[0] == "pass"
        # altered after sealing: the chain no longer verifies
        altered = arc_verify(got.data.replace(b"forward me", b"forward mE"), dns)
        assert altered.startswith("fail"), altered


def test_no_arc_set_when_sealing_is_off(serve, dns, port, world, keys):  # noqa: F811
    server = start(serve, dns, port, keys, checks={"arc_seal": False})
    assert send(server, "bob@example.test") == 250
    (got,) = world.wait_for(1)
    assert arc_fields(got.data) == []
    assert mail_dkim(got.data, dns)[0] == "pass"  # still signed


def test_no_arc_set_without_our_authentication_results(serve, dns, port, world, keys):  # noqa: F811
    # Locally submitted mail (a trusted client): results of another server are not ours to seal.
    server = start(serve, dns, port, keys, server={"trusted_networks": ["127.0.0.0/8"]})
    foreign_ar = MSG.replace(b"Authentication-Results: mx.example.test;", b"Authentication-Results: mx.other.test;")
    assert send(server, "bob@example.test", data=foreign_ar) == 250
    (got,) = world.wait_for(1)
    assert arc_fields(got.data) == []


def test_a_second_hop_extends_an_arc_chain_that_came_in(serve, dns, port, world, keys, tmp_path):  # noqa: F811
    # Mail sealed by another implementation (Mail::DKIM::ARC::Signer, i=1) for other.test
    # arrives and is forwarded: monomail checks the chain it came with and adds i=2, cv=pass.
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(other)],
                   check=True, capture_output=True, timeout=60)
    pub = subprocess.run(["openssl", "pkey", "-in", str(other), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True, timeout=60).stdout
    import base64
    dns.txt("arc._domainkey.other.test", "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode())
    first = MSG.replace(b"mx.example.test;", b"mx.other.test;")
    p = subprocess.run(["perl", str(PERL / "arc_verify_seal.pl"), str(other), "other.test", "arc", "mx.other.test"],
                       input=first, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr.decode()
    sealed_once = p.stdout
    assert arc_verify(sealed_once, dns).startswith("pass")
    server = start(serve, dns, port, keys)
    assert send(server, "bob@example.test", data=MSG.split(b"\r\n", 1)[0] + b"\r\n" + sealed_once) == 250
    (got,) = world.wait_for(1)
    assert b"i=2; cv=pass" in got.data.replace(b"\r\n ", b" ")
    result = arc_verify(got.data, dns)
    assert result.startswith("pass") and "as.2.example.test=pass" in result and "as.1.other.test=pass" in result, result


def test_a_forged_from_of_ours_from_outside_is_forwarded_without_our_signature(serve, dns, port, world,
                                                                                 keys):  # noqa: F811
    # From: our own domain, sent in from outside, accepted because DMARC only monitors: a
    # forward must not lend it an aligned d=example.test signature (the next receiver would
    # see a DMARC pass for a forgery). The ARC seal records honestly what we saw.
    server = start(serve, dns, port, keys, checks={"dmarc": "monitor"})
    forged = MSG.replace(b"From: Poster <poster@elsewhere.test>", b"From: CEO <ceo@example.test>")
    assert send(server, "bob@example.test", data=forged) == 250
    (got,) = world.wait_for(1)
    assert signatures(got.data) == []
    assert arc_fields(got.data) == ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]
    assert b"dmarc=pass" not in got.data.split(b"\r\n\r\n", 1)[0]
