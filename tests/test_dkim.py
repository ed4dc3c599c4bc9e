"""DKIM signing of mail leaving the host, checked by implementations other than dkimpy.

Mail goes through a real server to SMTP peers on 127.0.0.x, with MX answers and the
published keys (TXT) served by the DNS server on loopback (tests/peers.py). What the
peer received is verified by Perl's Mail::DKIM (Debian's libmail-dkim-perl: RSA; it has
no Ed25519) and, for Ed25519, by OpenDKIM's ``opendkim-testmsg`` (libopendkim 2.11),
which asks the system resolver: it runs in its own mount namespace with a resolv.conf
pointing at a relay on 127.x.y.z:53 in front of the test DNS server. Both must say
``fail`` for a message altered after signing, so the checks can fail.

Also: ``monomail dkim keygen`` (mode 0600, no overwriting, the printed record verifies),
unreadable keys as config errors, a signing failure that still delivers (unsigned), and
``dkimsig.verify`` (what the inbound checks use) for pass, fail, temperror, permerror.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import shutil
import smtplib
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import cli, relay, wait_until
from peers import DNSServer

from monomail import dkimsig
from monomail.errors import DestinationError, Reply
from monomail.settings import DKIMDomain

PERL = Path(__file__).resolve().parent / "perl"
MSG = (b"From: Alice <alice@example.test>\r\nTo: x@remote.test\r\nSubject: signed mail\r\n"
       b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\nline one\r\n.dot line\r\nend\r\n")

needs_mail_dkim = pytest.mark.skipif(
    subprocess.run(["perl", "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver", "-e1"],
                   capture_output=True).returncode != 0 if shutil.which("perl") else True,
    reason="Perl's Mail::DKIM (libmail-dkim-perl) is not installed")


@dataclass(frozen=True)
class Keys:
    rsa: Path
    rsa_record: str
    ed: Path
    ed_record: str

    def config(self, ed25519: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"selector": "mail", "key": str(self.rsa)}
        if ed25519:
            d |= {"ed25519_selector": "ed", "ed25519_key": str(self.ed)}
        return {"example.test": d}

    def publish(self, dns: DNSServer) -> None:
        dns.txt("mail._domainkey.example.test", self.rsa_record)
        dns.txt("ed._domainkey.example.test", self.ed_record)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("dkim")
    rsa, ed = d / "example.test.mail.key", d / "example.test.ed.key"
    return Keys(rsa, dkimsig.keygen("example.test", "mail", "rsa", rsa),
                ed, dkimsig.keygen("example.test", "ed", "ed25519", ed))


@pytest.fixture
def world(dns, port, peers, keys):
    """remote.test and elsewhere.test → a peer on 127.0.0.2; our keys published."""
    for domain in ("remote.test", "elsewhere.test"):
        dns.mx(domain, (10, "mx.peer.test"))
    dns.a("mx.peer.test", "127.0.0.2")
    keys.publish(dns)
    return peers("127.0.0.2", port, rcpt_replies={"perm": "550 5.1.1 no such user"})


def send(server, rcpts: list[str], sender: str = "alice@example.test", data: bytes = MSG) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250, r
        return s.data(data)


def mail_dkim(message: bytes, dns: DNSServer) -> tuple[str, str]:
    """(overall result, per-signature lines) from Mail::DKIM::Verifier."""
    p = subprocess.run(["perl", str(PERL / "dkim_verify.pl"), dns.host, str(dns.port)], input=message,
                       capture_output=True, timeout=30)
    lines = p.stdout.decode().splitlines()
    assert lines and lines[-1].startswith("overall "), p.stderr.decode()
    return lines[-1].split()[1], "\n".join(lines[:-1])


def signatures(message: bytes) -> list[str]:
    """The DKIM-Signature fields of a (CRLF) message, unfolded."""
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    return re.findall(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.MULTILINE | re.IGNORECASE)


def tag(sig: str, name: str) -> str:
    m = re.search(rf"(?:^|;)\s*{name}=([^;]*)", re.sub(r"\r\n[ \t]", " ", sig))
    assert m, (name, sig)
    return re.sub(r"\s+", "", m.group(1))


def without_rsa(message: bytes) -> bytes:
    """The message without its rsa-sha256 DKIM-Signature (so only the Ed25519 one is checked)."""
    return re.sub(rb"DKIM-Signature:[^\r]*a=rsa-sha256(?:[^\r]*|\r\n[ \t][^\r]*)*\r\n(?:[ \t][^\r]*\r\n)*", b"",
                  message, count=1)


# -- OpenDKIM, for Ed25519 ------------------------------------------------------------------


class SystemDNS:
    """A UDP relay on 127.x.y.z:53 to the test DNS server, and a resolv.conf naming it, so a
    program that only asks the system resolver (libopendkim) reaches the test zones."""

    def __init__(self, dns: DNSServer, directory: Path) -> None:
        self.dns = dns
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        host = f"127.{random.randint(1, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
        self.sock.bind((host, 53))
        self.sock.settimeout(0.2)
        self.resolv_conf = directory / "resolv.conf"
        self.resolv_conf.write_text(f"nameserver {host}\noptions timeout:2 attempts:2\n")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                query, client = self.sock.recvfrom(4096)
            except OSError:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up, contextlib.suppress(OSError):
                up.settimeout(2)
                up.sendto(query, (self.dns.host, self.dns.port))
                self.sock.sendto(up.recvfrom(4096)[0], client)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()

    def opendkim(self, message: bytes) -> subprocess.CompletedProcess[bytes]:
        """``opendkim-testmsg`` (verify mode) in a private mount namespace whose
        /etc/resolv.conf is ours; exit status 0 means every signature verified."""
        script = 'mount --bind "$1" /etc/resolv.conf && exec opendkim-testmsg'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(self.resolv_conf)],
                              input=message.replace(b"\r\n", b"\n"), capture_output=True, timeout=30)


@pytest.fixture
def system_dns(dns, tmp_path) -> Iterator[SystemDNS]:
    if not shutil.which("opendkim-testmsg"):
        pytest.skip("opendkim-testmsg (opendkim-tools) is not installed")
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root for a mount namespace and port 53 (opendkim asks the system resolver)")
    relay_ = SystemDNS(dns, tmp_path)
    yield relay_
    relay_.close()


# -- acceptance 1: submitted mail is signed, RSA and Ed25519 --------------------------------


@needs_mail_dkim
def test_relayed_mail_carries_rsa_signature_that_mail_dkim_verifies(serve, dns, port, world, keys):
    server = relay(serve, dns, port, dkim=keys.config())
    assert send(server, ["x@remote.test"])[0] == 250
    (got,) = world.wait_for(1)
    sigs = signatures(got.data)
    assert [tag(s, "a") for s in sigs] == ["rsa-sha256", "ed25519-sha256"]  # both keys, both signatures
    for s in sigs:
        assert tag(s, "d") == "example.test" and tag(s, "c") == "relaxed/relaxed"
        assert tag(s, "h").lower().split(":") == ["from", "to", "subject", "date", "message-id", "from"]
    result, detail = mail_dkim(got.data, dns)
    assert result == "pass" and "pass example.test mail rsa-sha256" in detail, detail
    # Altered in transit: the body, a signed header, or a second From added: none verifies.
    body = got.data.replace(b"line one", b"line 1")
    subject = got.data.replace(b"Subject: signed mail", b"Subject: signed mall")
    head, _, rest = got.data.partition(b"\r\n\r\n")
    added_from = head + b"\r\nFrom: Mallory <boss@example.test>\r\n\r\n" + rest
    for altered in (body, subject, added_from):
        result, detail = mail_dkim(altered, dns)
        assert result == "fail" and "fail example.test mail rsa-sha256" in detail, detail
    # and with the key withdrawn from the DNS, no pass either
    dns.txt("mail._domainkey.example.test", "v=DKIM1; k=rsa; p=")
    assert mail_dkim(got.data, dns)[0] != "pass"


def test_relayed_mail_carries_ed25519_signature_that_opendkim_verifies(serve, dns, port, world, keys, system_dns):
    server = relay(serve, dns, port, dkim=keys.config())
    assert send(server, ["x@remote.test"])[0] == 250
    (got,) = world.wait_for(1)
    only_ed = without_rsa(got.data)
    assert [tag(s, "a") for s in signatures(only_ed)] == ["ed25519-sha256"]
    p = system_dns.opendkim(only_ed)
    assert p.returncode == 0, p.stderr
    assert ("ed._domainkey.example.test", "TXT") in dns.queries  # it did ask our DNS for the key
    p = system_dns.opendkim(only_ed.replace(b"line one", b"line 1"))
    assert p.returncode != 0 and b"Bad signature" in p.stderr, p.stderr
    # a key that is not the signer's: no pass
    dns.txt("ed._domainkey.example.test", "v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(32)).decode())
    assert system_dns.opendkim(only_ed).returncode != 0


@needs_mail_dkim
def test_mail_from_a_domain_not_ours_is_not_signed(serve, dns, port, world, keys):
    server = relay(serve, dns, port, dkim=keys.config())
    foreign = MSG.replace(b"alice@example.test", b"someone@elsewhere.test")
    assert send(server, ["x@remote.test"], sender="someone@elsewhere.test", data=foreign)[0] == 250
    (got,) = world.wait_for(1)
    assert signatures(got.data) == []


@needs_mail_dkim
def test_subdomain_is_signed_by_the_parent_domain_after_masquerading(serve, dns, port, world, keys):
    server = relay(serve, dns, port, dkim=keys.config(ed25519=False),
                   masquerade={"domains": ["example.test"]})
    sub = MSG.replace(b"alice@example.test", b"alice@host.example.test")
    assert send(server, ["x@remote.test"], sender="alice@host.example.test", data=sub)[0] == 250
    (got,) = world.wait_for(1)
    assert b"From: Alice <alice@example.test>" in got.data  # masqueraded, then signed
    (sig,) = signatures(got.data)
    assert tag(sig, "d") == "example.test"
    assert mail_dkim(got.data, dns)[0] == "pass"


# -- acceptance 1 (end): bounces, list posts and forwards are signed --------------------------


@needs_mail_dkim
def test_bounce_leaving_the_host_is_signed(serve, dns, port, world, keys):
    server = relay(serve, dns, port, dkim=keys.config())
    foreign = MSG.replace(b"alice@example.test", b"someone@elsewhere.test")
    # one good recipient, so the failure becomes a bounce rather than a refusal at DATA
    assert send(server, ["x@remote.test", "perm@remote.test"], sender="someone@elsewhere.test", data=foreign)[0] == 250
    world.wait_for(2)
    (dsn,) = [r for r in world.received if r.mail_from == ""]
    assert dsn.rcpt_tos == ["someone@elsewhere.test"]
    assert b"MAILER-DAEMON@mx.example.test" in dsn.data
    assert [tag(s, "d") for s in signatures(dsn.data)] == ["example.test", "example.test"]
    result, detail = mail_dkim(dsn.data, dns)
    assert result == "pass", detail


@needs_mail_dkim
def test_list_post_and_forward_with_rewritten_sender_are_signed(serve, dns, port, world, keys):
    server = relay(serve, dns, port, dkim=keys.config(),
                   forward={"bob": {"to": ["bob@remote.test"]}},
                   lists={"dev": {"address": "dev@example.test", "members": ["carol@remote.test"],
                                  "policy": "open"}})
    outside = MSG.replace(b"alice@example.test", b"poster@elsewhere.test")
    assert send(server, ["bob@example.test"], sender="poster@elsewhere.test", data=outside)[0] == 250
    assert send(server, ["dev@example.test"], sender="poster@elsewhere.test", data=outside)[0] == 250
    world.wait_for(2)
    by_rcpt = {r.rcpt_tos[0]: r for r in world.received}
    forward, post = by_rcpt["bob@remote.test"], by_rcpt["carol@remote.test"]
    assert forward.mail_from == "bob@example.test" and post.mail_from == "dev-bounces@example.test"
    for got in (forward, post):
        # From: is the foreign poster's; the signature is for the domain of the envelope sender
        assert [tag(s, "d") for s in signatures(got.data)] == ["example.test", "example.test"]
        result, detail = mail_dkim(got.data, dns)
        assert result == "pass", detail
        assert b"ARC-Seal" not in got.data  # sent by a trusted client: no results of ours to seal
    (post_sig, _) = signatures(post.data)
    assert "list-id" in tag(post_sig, "h").lower().split(":")  # the list headers are signed too


# -- failures never lose mail; bad keys stop start-up -----------------------------------------


def _der(tag_: int, content: bytes) -> bytes:
    assert len(content) < 128
    return bytes([tag_, len(content)]) + content


def test_signing_failure_sends_the_mail_unsigned(serve, dns, port, world, tmp_path, caplog):
    # A well-formed RSA key far too small to sign a SHA-256 digest: it loads, signing fails.
    ints = b"".join(_der(2, bytes([n])) for n in (0, 77, 5, 29, 7, 11, 1, 1, 1))
    pem = (b"-----BEGIN RSA PRIVATE KEY-----\n" + base64.b64encode(_der(0x30, ints))
           + b"\n-----END RSA PRIVATE KEY-----\n")
    (tmp_path / "tiny.key").write_bytes(pem)
    server = relay(serve, dns, port, dkim={"example.test": {"selector": "mail", "key": str(tmp_path / "tiny.key")}})
    assert send(server, ["x@remote.test"])[0] == 250
    (got,) = world.wait_for(1)
    assert signatures(got.data) == [] and b"line one" in got.data
    wait_until(lambda: "DKIM signing of mail to remote.test failed" in caplog.text)


@pytest.mark.parametrize("content", [
    None, b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_unusable_key_is_a_config_error_naming_the_key(tmp_path, content):
    key = tmp_path / "k.pem"
    if content is not None:
        key.write_bytes(content)
    (tmp_path / "monomail.toml").write_text(
        'hostname = "mx.example.test"\n[local]\ndomains = ["example.test"]\n'
        f'[dkim."example.test"]\nselector = "mail"\nkey = "{key}"\n')
    p = cli("check-config", "-c", str(tmp_path / "monomail.toml"))
    assert p.returncode == 2, p.stderr
    assert 'dkim."example.test".key' in p.stderr and "Traceback" not in p.stderr


# -- acceptance 5 (keygen part): mode 0600, no overwriting, the printed record verifies --------


def zone_value(output: str, name: str) -> str:
    """The TXT value of ``name`` in zone-file lines: its quoted strings joined."""
    (line,) = [x for x in output.splitlines() if x.startswith(name + ". ")]
    assert " IN TXT " in line
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
    assert all(len(s) <= 255 for s in strings)
    return "".join(strings)


@needs_mail_dkim
def test_keygen_writes_private_key_and_prints_a_record_that_verifies(serve, dns, port, world, tmp_path,
                                                                     request):
    config = tmp_path / "monomail.toml"
    rsa = cli("dkim", "keygen", "example.test", "-c", str(config))
    assert rsa.returncode == 0, rsa.stderr
    ed = cli("dkim", "keygen", "example.test", "--algorithm", "ed25519", "-c", str(config))
    assert ed.returncode == 0, ed.stderr
    rsa_key, ed_key = tmp_path / "dkim" / "example.test.mail.key", tmp_path / "dkim" / "example.test.ed.key"
    for key in (rsa_key, ed_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert 'key = "dkim/example.test.mail.key"' in rsa.stdout and 'selector = "mail"' in rsa.stdout
    assert 'ed25519_key = "dkim/example.test.ed.key"' in ed.stdout and 'ed25519_selector = "ed"' in ed.stdout
    rsa_value = zone_value(rsa.stdout, "mail._domainkey.example.test")
    ed_value = zone_value(ed.stdout, "ed._domainkey.example.test")
    assert rsa_value.startswith("v=DKIM1; k=rsa; p=") and len(rsa_value) > 255  # 2048 bits: two strings
    assert ed_value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed_value.partition("p=")[2])) == 32  # RFC 8463: the raw public key
    # never over an existing key
    before = rsa_key.read_bytes()
    again = cli("dkim", "keygen", "example.test", "-c", str(config))
    assert again.returncode == 1 and "exists" in again.stderr and rsa_key.read_bytes() == before
    # published as printed, the records verify what the server signs with the keys
    dns.txt("mail._domainkey.example.test", rsa_value)
    dns.txt("ed._domainkey.example.test", ed_value)
    server = relay(serve, dns, port, dkim={"example.test": {
        "selector": "mail", "key": "dkim/example.test.mail.key",
        "ed25519_selector": "ed", "ed25519_key": "dkim/example.test.ed.key"}})
    assert send(server, ["x@remote.test"])[0] == 250
    (got,) = world.wait_for(1)
    result, detail = mail_dkim(got.data, dns)
    assert result == "pass" and "pass example.test mail rsa-sha256" in detail, detail
    if shutil.which("opendkim-testmsg") and os.geteuid() == 0:
        system_dns = request.getfixturevalue("system_dns")
        p = system_dns.opendkim(without_rsa(got.data))
        assert p.returncode == 0, p.stderr


def test_keygen_refuses_bad_domain_and_selector(tmp_path):
    p = cli("dkim", "keygen", "bad domain", "-c", str(tmp_path / "monomail.toml"))
    assert p.returncode == 2 and "expected a domain name" in p.stderr
    p = cli("dkim", "keygen", "example.test", "--selector", "a/b", "-c", str(tmp_path / "monomail.toml"))
    assert p.returncode == 2 and "not a DKIM selector" in p.stderr
    assert not (tmp_path / "dkim").exists() or not list((tmp_path / "dkim").iterdir())


# -- dkimsig.verify, for the inbound checks ----------------------------------------------------


def test_verify_says_pass_fail_temperror_permerror(keys):
    config = SimpleNamespace(dkim={"example.test": DKIMDomain("example.test", "mail", keys.rsa, "ed", keys.ed)})
    signer = dkimsig.load_signer(config)  # type: ignore[arg-type]  # only .dkim is read
    assert signer is not None
    lf = MSG.replace(b"\r\n", b"\n")
    signed = dkimsig.sign(lf, signer, sender="alice@example.test")
    zone = {"mail._domainkey.example.test": [keys.rsa_record.encode()],
            "ed._domainkey.example.test": [keys.ed_record.encode()]}

    def lookup(name: str, rdtype: str) -> list[Any]:
        assert rdtype == "TXT"
        if name.startswith("down."):
            raise DestinationError(Reply(451, "4.4.3", "DNS lookup failed"), name)
        return zone.get(name, [])

    assert dkimsig.verify(lf, lookup) == []
    good = dkimsig.verify(signed, lookup)
    assert [(r.result, r.domain, r.selector, r.algorithm) for r in good] == [
        ("pass", "example.test", "mail", "rsa-sha256"), ("pass", "example.test", "ed", "ed25519-sha256")]
    assert all(len(r.header_b) == 8 for r in good)
    assert [r.result for r in dkimsig.verify(signed.replace(b"line one", b"line 1"), lookup)] == ["fail", "fail"]
    assert [r.result for r in dkimsig.verify(signed.replace(b"signed mail", b"signed mall"), lookup)] == [
        "fail", "fail"]
    assert dkimsig.verify(signed.replace(b"s=mail", b"s=down.mail"), lookup)[0].result == "temperror"
    assert dkimsig.verify(signed.replace(b"s=mail", b"s=gone"), lookup)[0].result == "permerror"
    assert dkimsig.verify(signed.replace(b"a=rsa-sha256", b"a=rsa-sha999"), lookup)[0].result == "permerror"


def test_the_openssl_rsa_signature_is_exactly_the_one_dkimpy_computes(tmp_path):
    """RSASSA-PKCS1-v1_5 is deterministic: dkimsig's OpenSSL signing (the speed-up) must
    give byte for byte what dkimpy's own Python arithmetic gives, for DKIM and ARC alike."""
    import hashlib

    from dkim import crypto

    from monomail import dkimsig

    key = tmp_path / "k.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
                   check=True, capture_output=True, timeout=60)
    parsed = crypto.parse_pem_private_key(key.read_bytes())
    for name in ("sha256", "sha1"):
        digest = hashlib.new(name, b"the canonicalised header fields")
        assert dkimsig._rsa_sign(digest, parsed) == crypto.RSASSA_PKCS1_v1_5_sign(digest, parsed)
    import dkim
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkimsig._rsa_sign  # what dkimpy's signing calls
