"""Issue 9, acceptance 5 and the limits around it: connections per client, errors per
session, the command and DATA deadlines. Real sockets from several 127.0.0.x sources."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import time

import pytest
from conftest import wait_until

from monomail.limits import Connections, FailureWindow, client_key

pytestmark = pytest.mark.timeout(120)

UNTRUSTED = {"trusted_networks": ["127.0.0.1/32"]}


def greet(source: str, port: int) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return s, s.recv(1000)


def deliver(port: int, source: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as smtp:
        smtp.sendmail("x@client.test", ["alice@example.test"], f"Subject: {subject}\r\n\r\nhello\r\n")


def test_one_address_cannot_take_every_connection(serve):
    server = serve(server=UNTRUSTED)
    held = []
    try:
        for _ in range(30):
            held.append(greet("127.0.0.9", server.port))
        greetings = [g for _, g in held]
        assert sum(g.startswith(b"220 ") for g in greetings) == 10
        refused = [g for g in greetings if not g.startswith(b"220 ")]
        assert len(refused) == 20 and all(g.startswith(b"421 4.7.0") for g in refused)
        deliver(server.port, "127.0.0.10", "served")  # another client is served meanwhile
        wait_until(lambda: len(list((server.config.local.mail_dir / "alice" / "new").iterdir())) == 1)
        _, trusted = greet("127.0.0.1", server.port)  # trusted networks are not counted
        assert trusted.startswith(b"220 ")
    finally:
        for s, _ in held:
            s.close()
    # The slots come back when the connections close.
    wait_until(lambda: server.app.server.per_client.count("127.0.0.9") == 0)
    s, g = greet("127.0.0.9", server.port)
    s.close()
    assert g.startswith(b"220 ")


def test_errors_end_the_session_at_max_errors(serve):
    server = serve(server={"max_errors": 3})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO x.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"RCPT TO:<alice@example.test>\r\n")
        assert f.readline().startswith(b"503 5.5.1")
        s.sendall(b"MAIL FROM:<a@x.test> FOO=1\r\n")
        assert f.readline().startswith(b"555 5.5.4")
        s.sendall(b"RCPT TO:<nobody@example.test>\r\n")
        assert f.readline().startswith(b"503 5.5.1")  # the third error ...
        assert f.readline().startswith(b"421 4.7.0 Too many errors")  # ... and then 421, on its own
        assert f.readline() == b""  # closed


def test_a_delivered_message_starts_the_error_count_again(serve):
    server = serve(server={"max_errors": 2})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        for n in range(3):
            assert smtp.docmd("RCPT", "TO:<alice@example.test>")[0] == 503
            smtp.sendmail("x@client.test", ["alice@example.test"], f"Subject: {n}\r\n\r\nhi\r\n")
        assert smtp.noop()[0] == 250


async def _slow_client(source: str, port: int, every: float) -> tuple[float, bytes]:
    """Connect, then send "EHLO slow.test" one byte every ``every`` seconds; when the server
    hangs up: (seconds it took, what it said last)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    start = time.monotonic()
    last = await reader.readline()
    try:
        for byte in b"EHLO slow.test-" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), every)
            except TimeoutError:
                continue
            if not line:
                break
            last = line
    except ConnectionError:
        pass
    writer.close()
    return time.monotonic() - start, last


def test_slow_clients_are_cut_off_by_the_command_deadline_while_others_are_served(serve):
    server = serve(server={**UNTRUSTED, "max_connections": 400, "command_timeout": "4s", "timeout": "5m"})
    sources = [f"127.0.1.{n}" for n in range(1, 21)]  # 20 addresses x 10 connections

    async def run() -> tuple[list[tuple[float, bytes]], list[float]]:
        slow = [asyncio.create_task(_slow_client(src, server.port, 3.0)) for src in sources for _ in range(10)]
        await asyncio.sleep(1.0)  # all 200 are connected and dribbling
        served = []
        for n in range(5):
            t = time.monotonic()
            await asyncio.to_thread(deliver, server.port, "127.0.0.10", f"normal {n}")
            served.append(time.monotonic() - t)
        return await asyncio.gather(*slow), served

    results, served = asyncio.run(run())
    assert len(results) == 200
    durations = sorted(d for d, _ in results)
    assert durations[-1] < 15, durations[-5:]  # the 4 s command deadline, far below the 5 min idle timeout
    assert durations[0] >= 3.5, durations[:5]
    assert all(last.startswith(b"421 4.4.2") for _, last in results), {last for _, last in results}
    assert max(served) < 5, served  # normal clients were served while the slow ones were connected
    wait_until(lambda: len(list((server.config.local.mail_dir / "alice" / "new").iterdir())) == 5)


def test_data_phase_has_its_own_deadline(serve):
    server = serve(server={"data_timeout": "2s", "timeout": "5m"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        for line in (b"HELO x.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<alice@example.test>", b"DATA"):
            s.sendall(line + b"\r\n")
            f.readline()
        start = time.monotonic()
        try:
            for _ in range(20):  # a byte every half second: never idle, never done
                s.sendall(b"x")
                time.sleep(0.5)
        except OSError:
            pass
        assert f.readline().startswith(b"421 4.4.2")
        assert 1.5 < time.monotonic() - start < 6
    assert not (server.config.local.mail_dir / "alice" / "new").exists() or \
        not list((server.config.local.mail_dir / "alice" / "new").iterdir())


def test_an_idle_client_is_closed_after_the_idle_timeout(serve):
    server = serve(server={"timeout": "1s", "command_timeout": "1m"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.recv(1000)
        start = time.monotonic()
        assert s.recv(1000) == b""
        assert time.monotonic() - start < 5


# -- the pure parts, with the clock handed in ----------------------------------------------


def test_client_key_groups_ipv6_by_64_and_unmaps_ipv4():
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%lo") == "fe80::/64"


def test_connections_count_per_key():
    c = Connections(2)
    assert c.open("a") and c.open("a") and not c.open("a") and c.open("b")
    c.close("a")
    assert c.open("a") and c.count("a") == 2
    for _ in range(3):
        c.close("b")
    assert c.count("b") == 0


def test_failure_window_blocks_at_the_limit_until_the_oldest_failure_leaves():
    now = [1000.0]
    w = FailureWindow(5, lambda: now[0], window=900)
    for i in range(4):
        now[0] += 60
        assert w.fail("x") == i + 1 and not w.blocked("x")
    now[0] += 60
    w.fail("x")
    assert w.blocked("x") and not w.blocked("y")
    now[0] = 1000 + 60 + 900  # the first failure is 15 minutes old
    assert not w.blocked("x")
    now[0] += 10_000
    assert not w.blocked("x") and w.fail("x") == 1
