"""The test-side fakes in ``peers.py`` behave like the outside world they stand for."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.nameserver
import dns.rcode
import dns.resolver
import pytest
from peers import DNSServer, SMTPPeer, self_signed_cert

pytestmark = pytest.mark.timeout(10)

MESSAGE = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    server = DNSServer().start()
    yield server
    server.stop()


def make_resolver(server: DNSServer, lifetime: float = 1.0) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


@pytest.fixture
def resolver(dns_server: DNSServer) -> dns.asyncresolver.Resolver:
    return make_resolver(dns_server)


@pytest.fixture
def peer() -> Iterator[Any]:
    """``peer(host="127.0.0.2", port=0, **options)`` → a started SMTPPeer (stopped at teardown)."""
    started: list[SMTPPeer] = []

    def start(host: str = "127.0.0.2", port: int = 0, **options: Any) -> SMTPPeer:
        p = SMTPPeer(host, port, **options).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    made = self_signed_cert(tmp_path_factory.mktemp("cert"))
    if made is None:
        pytest.skip("neither openssl nor cryptography can make a certificate")
    return made


async def send(p: SMTPPeer, recipients: list[str], **kwargs: Any) -> Any:
    kwargs.setdefault("start_tls", False)
    kwargs.setdefault("timeout", 3)
    kwargs.setdefault("sender", "a@src.test")
    return await aiosmtplib.send(MESSAGE, recipients=recipients,
                                 hostname=p.host, port=p.port, **kwargs)


async def ehlo(p: SMTPPeer, **kwargs: Any) -> dict[str, str]:
    client = aiosmtplib.SMTP(hostname=p.host, port=p.port, timeout=3, start_tls=False, **kwargs)
    await client.connect()
    try:
        await client.ehlo()
        return dict(client.esmtp_extensions)
    finally:
        await client.quit()


# -- DNS ---------------------------------------------------------------------------------------


def test_dns_address_and_loopback_only(dns_server: DNSServer) -> None:
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"
    assert dns_server.port > 0
    with pytest.raises(ValueError):
        DNSServer("0.0.0.0")


async def test_mx(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.mx("example.test", (20, "mx2.example.test"), (10, "mx1.example.test."), ttl=120)
    answer = await resolver.resolve("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in answer) == [
        (10, "mx1.example.test."), (20, "mx2.example.test.")]
    assert answer.rrset is not None and answer.rrset.ttl == 120
    assert dns_server.queries == [("example.test", "MX")]


async def test_null_mx(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.null_mx("nomail.test")
    answer = await resolver.resolve("nomail.test", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in answer] == [(0, ".")]


async def test_a_and_aaaa(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.a("mx1.example.test", "127.0.0.2", "127.0.0.3")
    dns_server.aaaa("mx1.example.test", "::1")
    a = await resolver.resolve("mx1.example.test", "A")
    aaaa = await resolver.resolve("mx1.example.test", "AAAA")
    assert sorted(r.address for r in a) == ["127.0.0.2", "127.0.0.3"]
    assert [r.address for r in aaaa] == ["::1"]


async def test_names_case_insensitive_and_trailing_dot(dns_server: DNSServer,
                                                       resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.a("Host.Example.TEST.", "127.0.0.4")
    for name in ("host.example.test", "HOST.example.test.", "hOsT.ExAmPlE.tEsT"):
        answer = await resolver.resolve(name, "A")
        assert [r.address for r in answer] == ["127.0.0.4"]
    assert dns_server.queries[0] == ("host.example.test", "A")


async def test_nodata_for_other_types(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.a("onlya.test", "127.0.0.5")
    for rdtype in ("MX", "AAAA", "TXT"):
        with pytest.raises(dns.resolver.NoAnswer):
            await resolver.resolve("onlya.test", rdtype)
    # a parent of a configured name is an empty non-terminal: NODATA, not NXDOMAIN
    dns_server.a("mx.parent.test", "127.0.0.6")
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("parent.test", "MX")


async def test_nxdomain(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("never.test", "MX")
    dns_server.a("gone.test", "127.0.0.7")
    await resolver.resolve("gone.test", "A")
    dns_server.nxdomain("gone.test")
    for rdtype in ("A", "MX"):
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("gone.test", rdtype)


async def test_servfail(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.servfail("broken.test")
    with pytest.raises(dns.resolver.NoNameservers) as info:
        await resolver.resolve("broken.test", "MX")
    assert "SERVFAIL" in str(info.value)


async def test_drop_times_out(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.drop("slow.test")
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver.resolve("slow.test", "A")
    assert time.monotonic() - started < 3
    assert ("slow.test", "A") in dns_server.queries


async def test_answers_change_between_queries(dns_server: DNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    dns_server.a("flip.test", "127.0.0.2")
    assert [r.address for r in await resolver.resolve("flip.test", "A")] == ["127.0.0.2"]
    dns_server.a("flip.test", "127.0.0.3")  # replaces, doesn't append
    assert [r.address for r in await resolver.resolve("flip.test", "A")] == ["127.0.0.3"]
    dns_server.servfail("flip.test")
    with pytest.raises(dns.resolver.NoNameservers):
        await resolver.resolve("flip.test", "A")
    dns_server.a("flip.test", "127.0.0.4")  # records clear an override
    assert [r.address for r in await resolver.resolve("flip.test", "A")] == ["127.0.0.4"]
    dns_server.clear("flip.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("flip.test", "A")
    dns_server.zone["raw.test"] = {"A": (60, ["127.0.0.8"])}  # the zone dict itself is editable
    assert [r.address for r in await resolver.resolve("raw.test", "A")] == ["127.0.0.8"]


async def test_aa_flag_udp_and_tcp(dns_server: DNSServer) -> None:
    dns_server.mx("example.test", (10, "mx1.example.test"))
    query = dns.message.make_query("example.test", "MX")
    for transport in (dns.asyncquery.udp, dns.asyncquery.tcp):
        response = await transport(query, "127.0.0.1", timeout=2, port=dns_server.port)
        assert response.flags & dns.flags.AA
        assert response.rcode() == dns.rcode.NOERROR
        assert len(response.answer) == 1
    nx = await dns.asyncquery.udp(dns.message.make_query("nope.test", "A"), "127.0.0.1", timeout=2,
                                  port=dns_server.port)
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA


async def test_other_ways_to_set_the_port(dns_server: DNSServer) -> None:
    dns_server.a("port.test", "127.0.0.9")
    by_map = dns.asyncresolver.Resolver(configure=False)
    by_map.nameservers = ["127.0.0.1"]
    by_map.nameserver_ports = {"127.0.0.1": dns_server.port}
    by_object = dns.asyncresolver.Resolver(configure=False)
    by_object.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", dns_server.port)]
    for r in (by_map, by_object):
        r.lifetime = 1
        assert [a.address for a in await r.resolve("port.test", "A")] == ["127.0.0.9"]


# -- SMTP --------------------------------------------------------------------------------------


def test_peers_share_a_port_on_several_loopback_addresses(peer: Any) -> None:
    first = peer("127.0.0.2", 0)
    second = peer("127.0.0.3", first.port)
    assert first.port == second.port
    for p in (first, second):
        with socket.create_connection((p.host, p.port), timeout=2) as s:
            assert s.recv(100).startswith(b"220 peer.test")
    with pytest.raises(ValueError):
        SMTPPeer("0.0.0.0", 0)


async def test_receives_a_message(peer: Any) -> None:
    p = peer()
    errors, reply = await send(p, ["bob@dst.test", "carol@dst.test"])
    assert errors == {} and reply.startswith("2.0.0 OK")
    [got] = p.wait_for(1)
    assert got.mail_from == "a@src.test"
    assert got.rcpt_tos == ["bob@dst.test", "carol@dst.test"]
    assert got.data == MESSAGE  # CRLF kept, dot-unstuffed
    assert got.tls is False and got.auth_user is None
    assert got.peer.startswith("127.")
    assert p.connections == 1


async def test_null_sender_and_mail_options(peer: Any) -> None:
    p = peer()
    client = aiosmtplib.SMTP(hostname=p.host, port=p.port, timeout=3, start_tls=False)
    await client.connect()
    await client.ehlo()
    await client.mail("", options=["BODY=8BITMIME", "SMTPUTF8"])  # aiosmtplib.send() refuses sender=""
    await client.rcpt("bob@dst.test")
    await client.data(MESSAGE)
    await client.quit()
    [got] = await p.wait_for_async(1)
    assert got.mail_from == ""
    assert got.mail_options == ["BODY=8BITMIME", "SMTPUTF8"]


async def test_per_recipient_replies(peer: Any) -> None:
    p = peer(rcpt_replies={"temp": "450 4.2.0 try later", "perm": "550 5.1.1 no such user"})
    errors, _ = await send(p, ["ok@dst.test", "temp1@dst.test", "perm-x@dst.test", "Temp2@dst.test"])
    assert {rcpt: (r.code, r.message) for rcpt, r in errors.items()} == {
        "temp1@dst.test": (450, "4.2.0 try later"),
        "perm-x@dst.test": (550, "5.1.1 no such user"),
        "Temp2@dst.test": (450, "4.2.0 try later"),
    }
    [got] = p.wait_for(1)
    assert got.rcpt_tos == ["ok@dst.test"]
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(p, ["perm@dst.test"])


@pytest.mark.parametrize("reply", ["451 4.3.0 later", "554 5.0.0 no"])
async def test_data_reply(peer: Any, reply: str) -> None:
    p = peer(data_reply=reply)
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(p, ["bob@dst.test"])
    assert info.value.code == int(reply[:3])
    assert info.value.message == reply[4:]
    assert p.received == [] and len(p.rejected) == 1
    with pytest.raises(TimeoutError):
        p.wait_for(1, timeout=0.2)


async def test_starttls_offered_and_used(peer: Any, cert: tuple[str, str]) -> None:
    p = peer(tls_cert=cert)
    assert "starttls" in await ehlo(p)
    await send(p, ["bob@dst.test"], start_tls=True, validate_certs=False)
    await send(p, ["carol@dst.test"], start_tls=False)
    first, second = p.wait_for(2)
    assert first.tls is True and second.tls is False
    assert "starttls" not in await ehlo(peer())  # no certificate, no STARTTLS


async def test_auth_required_after_starttls(peer: Any, cert: tuple[str, str]) -> None:
    p = peer(tls_cert=cert, require_auth=("user", "secret"))
    assert "auth" not in await ehlo(p)  # only after STARTTLS
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await send(p, ["bob@dst.test"], start_tls=True, validate_certs=False)
    assert info.value.code == 530
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as bad:
        await send(p, ["bob@dst.test"], start_tls=True, validate_certs=False, username="user", password="wrong")
    assert bad.value.code == 535
    await send(p, ["bob@dst.test"], start_tls=True, validate_certs=False, username="user", password="secret")
    [got] = p.wait_for(1)
    assert got.auth_user == "user" and got.tls is True


async def test_auth_without_tls(peer: Any) -> None:
    p = peer(require_auth=("user", "secret"))
    ext = await ehlo(p)
    assert set(ext["auth"].split()) == {"LOGIN", "PLAIN"}
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await send(p, ["bob@dst.test"])
    assert (info.value.code, info.value.message) == (530, "5.7.0 Authentication required")
    await send(p, ["bob@dst.test"], username="user", password="secret")
    [got] = p.wait_for(1)
    assert got.auth_user == "user" and got.tls is False
    assert "auth" not in await ehlo(peer())  # never advertised when not configured


async def test_hang_never_greets(peer: Any) -> None:
    p = peer(hang=True)
    client = aiosmtplib.SMTP(hostname=p.host, port=p.port, timeout=1, start_tls=False)
    started = time.monotonic()
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await client.connect()
    assert time.monotonic() - started < 3
    assert p.connections == 1


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 no service"])
async def test_greeting_reply(peer: Any, greeting: str) -> None:
    p = peer(greeting_reply=greeting)
    client = aiosmtplib.SMTP(hostname=p.host, port=p.port, timeout=2, start_tls=False)
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as info:
        await client.connect()
    assert info.value.code == int(greeting[:3])
    assert p.connections == 1


async def test_ehlo_and_helo_refused(peer: Any) -> None:
    p = peer(ehlo_reply="450 4.0.0 not now")
    client = aiosmtplib.SMTP(hostname=p.host, port=p.port, timeout=2, start_tls=False)
    await client.connect()
    with pytest.raises(aiosmtplib.SMTPHeloError) as info:
        await client.ehlo()
    assert info.value.code == 450
    with pytest.raises(aiosmtplib.SMTPHeloError):
        await client.helo()
    response = await client.execute_command(b"MAIL", b"FROM:<a@src.test>")
    assert response.code == 503
    client.close()


async def test_default_ehlo_keywords(peer: Any) -> None:
    ext = await ehlo(peer())
    assert "smtputf8" in ext and "8bitmime" in ext
    assert "size" not in ext and "auth" not in ext and "starttls" not in ext


async def test_ehlo_without_smtputf8_8bitmime_and_with_size(peer: Any) -> None:
    p = peer(smtputf8=False, eightbitmime=False, size=1000)
    ext = await ehlo(p)
    assert "smtputf8" not in ext and "8bitmime" not in ext
    assert ext["size"] == "1000"
    client = aiosmtplib.SMTP(hostname=p.host, port=p.port, timeout=2, start_tls=False)
    await client.connect()
    await client.ehlo()
    assert (await client.execute_command(b"MAIL", b"FROM:<a@src.test> BODY=8BITMIME")).code == 555
    assert (await client.execute_command(b"MAIL", b"FROM:<a@src.test> SMTPUTF8")).code == 501
    assert (await client.execute_command(b"MAIL", b"FROM:<a@src.test> SIZE=2000")).code == 552
    await client.quit()
    with pytest.raises(aiosmtplib.SMTPResponseException) as info:
        await aiosmtplib.send(b"Subject: big\r\n\r\n" + b"x" * 60 + b"\r\n" * 20 * 50, sender="a@src.test",
                              recipients=["bob@dst.test"], hostname=p.host, port=p.port, start_tls=False, timeout=3)
    assert info.value.code == 552
    await send(p, ["bob@dst.test"])
    [options] = p.wait_for(1)[0].mail_options  # aiosmtplib adds SIZE= when SIZE is advertised
    assert options.startswith("SIZE=")


async def test_drop_after_rcpt(peer: Any) -> None:
    p = peer(drop_after_rcpt=True)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(p, ["bob@dst.test"])
    assert p.received == [] and p.connections == 1


async def test_wait_for_from_another_thread(peer: Any) -> None:
    p = peer()
    waiter = asyncio.get_running_loop().run_in_executor(None, p.wait_for, 2, 4)
    await send(p, ["bob@dst.test"])
    await send(p, ["carol@dst.test"])
    got = await waiter
    assert [r.rcpt_tos for r in got] == [["bob@dst.test"], ["carol@dst.test"]]
    assert p.connections == 2


def test_self_signed_cert_files(tmp_path: Path) -> None:
    made = self_signed_cert(tmp_path / "c")
    if made is None:
        pytest.skip("no certificate tooling")
    certfile, keyfile = made
    assert Path(certfile).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" in Path(keyfile).read_text()
