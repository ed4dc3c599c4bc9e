"""Who is on the other end of the local submission socket: a uid on this host.

Job: the peer credentials of a connection on the server's UNIX socket (``SO_PEERCRED``:
the kernel's word, which the client cannot choose) as a `LocalPeer`: the uid, its login
name (the passwd database), and whether it is trusted to set any envelope sender
(``policy.trusted_user``: root, the server's own uid, ``local.trusted_users``). Also the
Received field of mail a local user submitted (RFC 5321 §4.4), which says so: ``from
user (uid N)``, with no address.

Not here: the sender rule itself (``policy.local_sender``), the listener (``server``).
"""

from __future__ import annotations

import email.utils
import os
import socket
import struct
from dataclasses import dataclass

from . import policy
from .accounts import by_uid
from .message import safe_word
from .settings import Config

_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True, slots=True)
class LocalPeer:
    uid: int
    name: str | None  # the login name; None when the passwd database has none
    trusted: bool  # may set any sender

    @property
    def label(self) -> str:
        """For the log and the Received field: ``alice (uid 1000)``."""
        return f"{safe_word(self.name) if self.name else 'unknown'} (uid {self.uid})"


def peer_of(sock: socket.socket | None, config: Config) -> LocalPeer | None:
    """The peer of a UNIX socket connection, or None when the kernel does not say."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, struct.error):
        return None
    return peer_for_uid(uid, config)


def peer_for_uid(uid: int, config: Config) -> LocalPeer:
    name = by_uid(uid)
    return LocalPeer(uid, name, policy.trusted_user(uid, name, config, os.geteuid()))


def received_local(peer: LocalPeer, *, helo: str, hostname: str, protocol: str, queue_id: str,
                   recipient: str | None, when: float) -> bytes:
    """``Received: from user (uid N) by host (monomail) with ESMTP id QID for <rcpt>; date``."""
    text = f"Received: from {peer.label}\n\t(helo {safe_word(helo)})\n"
    text += f"\tby {hostname} (monomail, local submission) with {protocol} id {queue_id}"
    if recipient:
        text += f"\n\tfor <{recipient}>"
    return (text + f"; {email.utils.formatdate(when, localtime=True)}\n").encode("utf-8", "surrogateescape")
