"""What a session asks of the server that holds it, and what the end of DATA reads off a
session: the two sides as typing protocols, so that ``session``, ``authexchange`` and
``finish`` need not import the modules that import them.

Not here: any behaviour (``server``, ``session``).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..auth import Authenticator
from ..errors import Reply
from ..limits import FailureWindow
from ..localpeer import LocalPeer
from ..metrics import Metrics
from ..queue import Queue
from ..resolver import Resolver
from ..router import Tables
from ..settings import Config
from ..tls import Certificates


class Host(Protocol):
    """The server's side (`server.SMTPServer`)."""

    config: Config
    tables: Tables | None
    certificates: Certificates | None
    auth: Authenticator
    resolver: Resolver
    queue: Queue
    metrics: Metrics
    failures: FailureWindow

    @property
    def handshake_timeout(self) -> float: ...

    def admit(self, session: Any) -> Reply | None: ...

    def release(self, session: Any) -> bool: ...

    def greeting(self, core: Any) -> bytes: ...


class Peer(Protocol):
    """A session as the end of DATA sees it (`session.Session`)."""

    mm: Host
    cfg: Config
    kind: str
    peer_ip: str
    trusted: bool
    local: LocalPeer | None
