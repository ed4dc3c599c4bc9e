"""Where log lines go and how they look: the log file, standard error, the local syslog.

Job: `setup` installs the handlers ``[log]`` asks for on the root logger (``monomail
serve``): the file ``log.file`` (created 0600, never left to the umask) or else standard
error, and with ``log.syslog = true`` also the local syslog socket (``log.syslog_socket``,
default ``/dev/log``, a UNIX datagram socket, facility mail, tag ``monomail[pid]``), so
the lines land in ``/var/log/mail.log`` beside the other daemons'. `reopen` opens the log
file again at its path (after logrotate moved it: SIGHUP). `for_command` is the same for
a command that changes the spool (``monomail queue delete``): its lines go to the mail
log file if it exists (never created here) and to syslog, nothing to the terminal.

Every line gets the queue id and the SMTP session it is about (``maillog.QUEUE_ID``,
``maillog.SESSION``, set by the queue and the server for the lines of modules that do
not know them): with ``log.format = "text"`` the message starts with the queue id (unless
it starts with one already) and ends with ``session=ID`` (unless it names one)::

    2026-12-01 14:36:09,123 INFO monomail.mail: 0190ab...: to=<a@b.test> status=deferred ... session=3fa9c2d1e0b4

with ``log.format = "json"`` each line is one JSON object: ``time`` (ISO 8601, UTC),
``level``, ``logger``, ``message``, and ``queue_id``/``session`` when known
(``exception`` with a traceback).

Error handling: a syslog socket that is missing or refuses a line never stops monomail or
floods standard error: one warning when it cannot be reached at start, one when it
first fails, and each line is tried again (syslogd restarted comes back by itself). A log
file that cannot be opened at start is an OSError for the caller (``serve`` stops with
it); one that cannot be reopened keeps the old file and says so.

Not here: what a mail event line says (``maillog``), signals (``app``).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from .maillog import QUEUE_ID, SESSION
from .safeio import make_dirs
from .settings import Config, LogConfig

LOG_MODE = 0o600
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "%(name)s: %(message)s"  # syslogd adds the time and the host
_LEADING_ID = re.compile(r"([0-9a-f]{21}): ")  # a queue id at the start of a message (envelope.new_id)

log = logging.getLogger("monomail")
_state: dict[str, LogFile | None] = {"file": None}


class ContextFilter(logging.Filter):
    """Puts ``queue_id`` and ``session`` on every record (from the message's own leading
    queue id, or the context variables); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "queue_id"):
            qid = QUEUE_ID.get()
            if not qid:
                try:
                    found = _LEADING_ID.match(record.getMessage())
                except Exception:  # a broken record: logging's own error handling reports it
                    found = None
                qid = found.group(1) if found else ""
            record.queue_id = qid
        if not hasattr(record, "session"):
            record.session = SESSION.get()
        return True


def text_message(record: logging.LogRecord) -> str:
    """The record's message with its queue id in front and its session at the end."""
    message = record.getMessage()
    qid = getattr(record, "queue_id", "")
    if qid and not message.startswith(qid) and not _LEADING_ID.match(message):
        message = f"{qid}: {message}"
    session = getattr(record, "session", "")
    if session and "session=" not in message:
        message = f"{message} session={session}"
    return message


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = text_message(record)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line (newlines in a message or traceback are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("queue_id", "session"):
            if value := getattr(record, key, ""):
                out[key] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class LogFile(logging.StreamHandler[TextIO]):
    """A log file opened with our mode (0600), appended to, and reopened on request."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        super().__init__(self._open(create))

    def _open(self, create: bool) -> TextIO:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(self.path, flags, LOG_MODE)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def reopen(self) -> None:
        """The file at ``path`` again (made if it is gone). Raises OSError (old file kept)."""
        stream = self._open(True)
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        old.close()

    def close(self) -> None:
        self.acquire()
        try:
            if not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
        super().close()


class Syslog(logging.handlers.SysLogHandler):
    """The local syslog socket (UNIX datagram), facility mail; failures said once."""

    def __init__(self, path: Path) -> None:
        super().__init__(address=str(path), facility=logging.handlers.SysLogHandler.LOG_MAIL,
                         socktype=socket.SOCK_DGRAM)
        self.ident = f"monomail[{os.getpid()}]: "
        self.warned = False

    def reachable(self) -> bool:
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:
            return False
        with probe:
            try:
                probe.connect(str(self.address))
            except OSError:
                return False
        return True

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if self.warned:
            return
        self.warned = True
        exc = sys.exc_info()[1]
        sys.stderr.write(f"monomail: syslog {self.address}: {exc}; lines that cannot be sent there are dropped\n")


def _handlers(cfg: LogConfig, file: LogFile | None, fallback: logging.Handler | None) -> list[logging.Handler]:
    formatter: logging.Formatter = JsonFormatter() if cfg.format == "json" else TextFormatter(TEXT_FORMAT)
    handlers: list[logging.Handler] = []
    main = file or fallback
    if main is not None:
        main.setFormatter(formatter)
        handlers.append(main)
    if cfg.syslog:
        syslog = Syslog(cfg.syslog_socket)
        syslog.setFormatter(JsonFormatter() if cfg.format == "json" else TextFormatter(SYSLOG_FORMAT))
        handlers.append(syslog)
    for h in handlers:
        h.addFilter(ContextFilter())
    return handlers


def _install(cfg: LogConfig, handlers: list[logging.Handler]) -> None:
    root = logging.getLogger()
    old = [h for h in root.handlers if h not in handlers]
    root.handlers[:] = handlers
    for h in old:
        h.close()
    root.setLevel(cfg.level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every connection at INFO
    for h in handlers:
        if isinstance(h, Syslog) and not h.reachable():
            h.warned = True  # this warning is the one
            log.warning("syslog socket %s cannot be reached now; lines are sent there once it can",
                        cfg.syslog_socket)


def setup(config: Config) -> None:
    """The handlers of ``[log]`` on the root logger (``serve``; called again, it replaces
    them). Raises OSError when the log file cannot be made or opened."""
    cfg = config.log
    file = None
    if cfg.file:
        make_dirs(cfg.file.parent, 0o700)
        file = LogFile(cfg.file)
    _state["file"] = file
    _install(cfg, _handlers(cfg, file, None if file else logging.StreamHandler(sys.stderr)))


def for_command(config: Config) -> None:
    """The mail log for a command run by an admin: the log file when it exists (appended
    to, not created: it is the server's), syslog when configured; never the terminal. A
    log file this user cannot open is said on standard error, once, and left alone."""
    cfg = config.log
    file = None
    if cfg.file:
        try:
            file = LogFile(cfg.file, create=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"monomail: warning: not logged to {cfg.file}: {exc.strerror or exc}", file=sys.stderr)
    handlers = _handlers(cfg, file, None)
    _install(cfg, handlers or [logging.NullHandler()])


def reopen() -> None:
    """Open the log file again at its configured path (SIGHUP, after logrotate moved it);
    nothing when the log goes to standard error. A file that cannot be opened keeps the
    old one, with a line saying so."""
    file = _state["file"]
    if file is None:
        return
    try:
        file.reopen()
    except OSError as exc:
        log.error("cannot reopen the log file %s, still writing to the old one: %s", file.path, exc)
