"""monomail.dovecotauth against a real Dovecot (tests/dovecot.py) and scripted auth servers.

The real Dovecot proves the protocol as Debian's dovecot-core speaks it; small asyncio UNIX
servers scripted here play the Dovecot answers that a healthy test Dovecot never gives
(temporary failure, another version, garbage, silence).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import dovecot
import pytest
from dovecot import DovecotAuth, running_dovecot

from monomail.dovecotauth import MAX_LINE, authenticate
from monomail.errors import AuthUnavailable

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-Passw0rd"
dovecot_auth = dovecot.dovecot_auth  # the shared fixture: a private Dovecot with no users yet


async def auth(dv: DovecotAuth, user: str, password: str | bytes, **kw: object) -> str | None:
    pw = password.encode() if isinstance(password, str) else password
    kw.setdefault("client_ip", "192.0.2.1")
    kw.setdefault("secured", True)
    return await authenticate(dv.socket, user, pw, **kw)  # type: ignore[arg-type]


# -- a real Dovecot ------------------------------------------------------------------------


@pytest.fixture
def dv() -> Iterator[DovecotAuth]:
    """A private Dovecot that knows alice from the start (set_password later costs up to 1 s)."""
    with running_dovecot({"alice": SECRET}) as started:
        yield started


async def test_right_password_gives_the_user_name(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET) == "alice"


async def test_wrong_password_and_unknown_user_are_no(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET + "x") is None
    assert await auth(dv, "alice", "") is None
    assert await auth(dv, "mallory", SECRET) is None
    dv.wait_for_log("passwd-file(alice,192.0.2.1): Password mismatch")
    dv.wait_for_log("passwd-file(mallory,192.0.2.1): unknown user")


async def test_replaced_password_is_seen_at_once(dovecot_auth: DovecotAuth) -> None:
    dovecot_auth.set_password("alice", "first-one")
    assert await auth(dovecot_auth, "alice", "first-one") == "alice"
    dovecot_auth.set_password("alice", "other-one")  # same hash length, same second
    assert await auth(dovecot_auth, "alice", "first-one") is None
    assert await auth(dovecot_auth, "alice", "other-one") == "alice"
    dovecot_auth.remove_user("alice")
    assert await auth(dovecot_auth, "alice", "other-one") is None


async def test_non_ascii_name_and_password() -> None:
    # Dovecot refuses non-ASCII names unless auth_username_chars allows them (empty: any).
    with running_dovecot({"zoë": "pässwörd €", "bob": "€uro"}, extra_config="auth_username_chars =\n") as dv:
        assert await auth(dv, "zoë", "pässwörd €") == "zoë"
        assert await auth(dv, "zoë", "passwort") is None
        assert await auth(dv, "bob", "€uro") == "bob"
        assert await auth(dv, "bob", "€urо") is None  # a Cyrillic o


async def test_the_name_dovecot_settles_on_is_returned() -> None:
    # auth_username_format rewrites the login name; Dovecot's OK carries the result.
    with running_dovecot({"alice": SECRET}, extra_config="auth_username_format = %Ln\n") as dv:
        assert await auth(dv, "ALICE@Example.TEST", SECRET) == "alice"


async def test_secured_and_client_address_reach_dovecot(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET, client_ip="192.0.2.77", secured=True) == "alice"
    assert await auth(dv, "alice", SECRET, client_ip="2001:db8::78", secured=False) == "alice"
    with_tls = dv.wait_for_log("rip=192.0.2.77")
    without = dv.wait_for_log("rip=2001:db8::78")
    assert "client in: AUTH\t1\tPLAIN\tservice=smtp\tnologin\t" in with_tls
    assert "\tsecured\t" in with_tls
    assert "secured" not in without
    assert with_tls.endswith("resp=<hidden>") and without.endswith("resp=<hidden>")
    dv.wait_for_log("passwd-file(alice,2001:db8::78): lookup")
    assert SECRET not in dv.log_text()


async def test_service_name_reaches_dovecot(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET, service="submission", client_ip="192.0.2.79") == "alice"
    assert "service=submission" in dv.wait_for_log("rip=192.0.2.79")


async def test_a_client_address_that_is_no_address_is_left_out(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET, client_ip="x\trip=10.0.0.1") == "alice"
    line = dv.wait_for_log("client in: AUTH")
    assert "rip=" not in line


@pytest.mark.parametrize("bad", ["al\tice", "alice\n", "alice\r", "al\0ice", ""])
async def test_names_that_break_the_protocol_are_no_without_asking(dv: DovecotAuth, bad: str) -> None:
    assert await auth(dv, bad, SECRET) is None
    assert await auth(dv, "alice", SECRET, client_ip="192.0.2.80") == "alice"  # a marker
    dv.wait_for_log("rip=192.0.2.80")
    assert dv.log_text().count("client in: AUTH") == 1  # the tab one never got there


async def test_nul_in_the_password_is_no_without_asking(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET.encode() + b"\0x") is None
    assert "client in: AUTH" not in dv.log_text()


async def test_dovecot_stopped_is_unavailable_and_recovers(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET) == "alice"
    dv.stop()
    with pytest.raises(AuthUnavailable) as caught:
        await auth(dv, "alice", SECRET)
    assert str(caught.value.reply) == "454 4.7.0 Temporary authentication failure"
    assert SECRET not in str(caught.value)
    dv.start()
    assert await auth(dv, "alice", SECRET) == "alice"


async def test_unreadable_users_file_is_a_temporary_failure(dv: DovecotAuth) -> None:
    assert await auth(dv, "alice", SECRET) == "alice"
    dv.users.chmod(0o600)  # root's: Dovecot's auth process (user dovecot) cannot read it
    os.utime(dv.users, (1, 1))  # a new mtime: Dovecot re-opens the file at its next look
    time.sleep(1.05)  # its next look: at most once per second
    with pytest.raises(AuthUnavailable, match="temporary failure"):
        await auth(dv, "alice", SECRET)
    dv.wait_for_log("Permission denied")


async def test_socket_missing_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AuthUnavailable, match="No such file"):
        await authenticate(tmp_path / "nothing-here", "alice", b"pw", client_ip="127.0.0.1", secured=True)


async def test_not_a_socket_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("")
    with pytest.raises(AuthUnavailable):
        await authenticate(tmp_path / "plain-file", "alice", b"pw", client_ip="127.0.0.1", secured=True)


async def test_many_at_once() -> None:
    with running_dovecot({f"user{n}": f"pw{n}" for n in range(5)}) as dv:
        tries = [auth(dv, f"user{n % 5}", f"pw{n % 5}" if n % 2 == 0 else "no") for n in range(40)]
        results = await asyncio.gather(*tries)
    assert results == [f"user{n % 5}" if n % 2 == 0 else None for n in range(40)]


async def test_one_authentication_is_quick(dv: DovecotAuth) -> None:
    await auth(dv, "alice", SECRET)  # the auth process is warm
    times = []
    for _ in range(20):
        start = time.perf_counter()
        assert await auth(dv, "alice", SECRET) == "alice"
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"dovecot auth, right password: median {times[10] * 1000:.1f} ms, worst {times[-1] * 1000:.1f} ms")
    assert times[10] < 0.2


def test_dovecot_listens_on_no_network_port(dv: DovecotAuth) -> None:
    pids = dv.pids()
    assert len(pids) >= 3  # master, log, config, anvil, auth...
    listening = subprocess.run(["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True, timeout=10)
    assert listening.returncode == 0, listening.stderr
    ours = [line for line in listening.stdout.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert ours == []
    unix = subprocess.run(["ss", "-H", "-l", "-x", "-p"], capture_output=True, text=True, timeout=10).stdout
    assert str(dv.socket) in unix  # ss does see its sockets


# -- scripted auth servers -----------------------------------------------------------------

HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
    b"SPID\t1\nCUID\t1\nCOOKIE\t" + b"ab" * 16 + b"\nDONE\n"
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Callable[[Script], Awaitable[Path]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> Path:
        path = tmp_path / f"fake{len(servers)}"

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        servers.append(await asyncio.start_unix_server(handle, path=str(path)))
        return path

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def answering(*lines: bytes, handshake: bytes = HANDSHAKE, seen: list[bytes] | None = None) -> Script:
    """Send the handshake, read the client's lines up to AUTH, answer with ``lines``."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake)
        while True:
            line = await reader.readline()
            if seen is not None:
                seen.append(line)
            if not line or line.startswith(b"AUTH"):
                break
        for line in lines:
            writer.write(line)
        await writer.drain()

    return script


async def ask(path: Path, user: str = "alice", password: bytes = b"pw", timeout: float = 5.0) -> str | None:
    return await authenticate(path, user, password, client_ip="127.0.0.1", secured=True, timeout=timeout)


async def test_a_server_that_never_answers_times_out(fake: Callable[[Script], Awaitable[Path]]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    path = await fake(silent)
    start = time.monotonic()
    with pytest.raises(AuthUnavailable, match="no answer within 0.5s"):
        await ask(path, timeout=0.5)
    assert time.monotonic() - start < 1.5


async def test_a_server_that_stalls_after_the_handshake_times_out(fake: Callable[[Script], Awaitable[Path]]) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering()(reader, writer)
        await asyncio.sleep(30)

    path = await fake(stall)
    start = time.monotonic()
    with pytest.raises(AuthUnavailable, match="no answer"):
        await ask(path, timeout=0.5)
    assert time.monotonic() - start < 1.5


async def test_what_the_client_sends(fake: Callable[[Script], Awaitable[Path]]) -> None:
    seen: list[bytes] = []
    path = await fake(answering(b"OK\t1\tuser=alice\n", seen=seen))
    assert await ask(path, "alice", b"p\xc3\xa4ss") == "alice"
    assert seen[0] == b"VERSION\t1\t2\n"
    assert seen[1].startswith(b"CPID\t") and seen[1][5:-1].isdigit()
    fields = seen[2].rstrip(b"\n").split(b"\t")
    assert fields[:6] == [b"AUTH", b"1", b"PLAIN", b"service=smtp", b"nologin", b"rip=127.0.0.1"]
    assert fields[6:8] == [b"secured", b"no-penalty"]
    assert fields[-1].startswith(b"resp=")  # last, as the protocol asks
    assert base64.b64decode(fields[-1][5:]) == b"\0alice\0p\xc3\xa4ss"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"OK\t1\tuser=alice\n", "alice"),
        (b"OK\t1\n", "alice"),  # no user=: the login name
        (b"OK\t1\tuser=alice@example.test\tsomething=else\n", "alice@example.test"),
        (b"OK\t1\tuser=a\x01tb\n", None),  # an escaped TAB in the answer: not a usable name
        (b"OK\t1\tuser=al\x01\x01ice\n", "al\x01ice"),
        (b"OK\t1\tuser=alice\tnologin\treason=go away\n", None),
        (b"OK\t1\tuser=alice\tproxy\thost=10.0.0.1\n", None),
        (b"FAIL\t1\tuser=alice\n", None),
        (b"FAIL\t1\n", None),
        (b"FAIL\t1\tuser=alice\tcode=user_disabled\n", None),
    ],
)
async def test_answers(fake: Callable[[Script], Awaitable[Path]], answer: bytes, expected: str | None) -> None:
    path = await fake(answering(answer))
    assert await ask(path) == expected


@pytest.mark.parametrize(
    ("handshake", "answer", "message"),
    [
        (HANDSHAKE, b"FAIL\t1\tuser=alice\tcode=temp_fail\treason=db down\n", "temporary failure 'db down'"),
        (HANDSHAKE, b"FAIL\t1\ttemp\n", "temporary failure"),
        (HANDSHAKE, b"CONT\t1\t\n", "unexpected answer line 'CONT\\t1\\t'"),
        (HANDSHAKE, b"OK\t2\tuser=alice\n", "unexpected answer"),
        (HANDSHAKE, b"\n", "unexpected answer"),
        (HANDSHAKE, b"OK\t1\tuser=al", "connection closed"),
        (HANDSHAKE, b"", "connection closed"),
        (HANDSHAKE, b"OK\t1\tuser=\xff\n", "not UTF-8"),
        (HANDSHAKE, b"OK\t1\tuser=" + b"a" * (MAX_LINE + 10) + b"\n", "longer than"),
        (HANDSHAKE.replace(b"VERSION\t1\t2", b"VERSION\t2\t0"), b"OK\t1\n", "protocol version 2"),
        (HANDSHAKE.replace(b"VERSION\t1\t2\n", b""), b"OK\t1\n", "without VERSION"),
        (HANDSHAKE.replace(b"MECH\tPLAIN\tplaintext\n", b""), b"OK\t1\n", "PLAIN not offered"),
        (HANDSHAKE.replace(b"DONE", b"WHAT\tever"), b"OK\t1\n", "unexpected handshake line 'WHAT\\tever'"),
    ],
)
async def test_unusable_answers_are_unavailable(
    fake: Callable[[Script], Awaitable[Path]], handshake: bytes, answer: bytes, message: str
) -> None:
    path = await fake(answering(answer, handshake=handshake))
    with pytest.raises(AuthUnavailable, match=message.replace("\\", "\\\\")) as caught:
        await ask(path, password=b"the-password")
    assert caught.value.reply.code == 454
    assert "the-password" not in str(caught.value)


async def test_a_server_that_closes_in_the_handshake(fake: Callable[[Script], Awaitable[Path]]) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HANDSHAKE.replace(b"DONE\n", b""))
        await reader.readline()
        await reader.readline()  # VERSION and CPID read: a clean close, not a reset

    path = await fake(hang_up)
    with pytest.raises(AuthUnavailable, match="connection closed"):
        await ask(path)


async def test_the_password_never_reaches_the_log(
    fake: Callable[[Script], Awaitable[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    encoded = base64.b64encode(b"\0alice\0the-password").decode()
    for answer in (b"OK\t1\n", b"OK\t1\tnologin\n", b"FAIL\t1\n", b"OK\t1\tuser=a\x01nb\n", b"BAD\n"):
        path = await fake(answering(answer))
        try:
            await ask(path, password=b"the-password")
        except AuthUnavailable as exc:
            assert "the-password" not in str(exc) and encoded not in str(exc)
    assert caplog.records  # something was logged
    assert "the-password" not in caplog.text and encoded not in caplog.text


async def test_a_bad_service_name_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        await authenticate(tmp_path / "x", "alice", b"pw", client_ip="127.0.0.1", secured=True, service="sm\ttp")
