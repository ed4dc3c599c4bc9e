"""Reading one TOML table key by key: typed getters whose errors name the dotted key.

Job: pure helpers for ``config`` (and only for it): `Table` remembers which keys were
read so that an unknown key is an error, and each getter checks a type and a range;
`parse_duration` ("30s", "5m", "4h", "5d"), `listen` ("host:port", "[v6]:port"),
`network` (CIDR) and `domain` read the value shapes several sections share. Every
error is a `ConfigError` whose key is the dotted path (``server.max_recipients``).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .settings import Listen, LMTPTarget

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\Z")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object, key: str) -> float:
    """``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``, or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as \"30s\", got {value!r}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ConfigError(key, f"expected a duration such as \"30s\", \"5m\", \"4h\", got {value!r}")


class Table:
    """One TOML table being read: typed getters that remember which keys were used."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, default: Any) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def string(self, name: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"expected a string, got {value!r}")
        if choices and value not in choices:
            raise ConfigError(self.key(name), f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(self.key(name), f"expected an integer >= {minimum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"expected true or false, got {value!r}")
        return value

    def strings(self, name: str, default: list[str]) -> list[str]:
        value = self.get(name, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self.key(name), f"expected a list of strings, got {value!r}")
        return value

    def duration(self, name: str, default: str) -> float:
        return parse_duration(self.get(name, default), self.key(name))

    def path_(self, name: str, default: str, base: Path) -> Path:
        return (base / self.string(name, default)).resolve()

    def optional_path(self, name: str, base: Path) -> Path | None:
        """The key's path resolved against ``base``; None when the key is absent."""
        value = self.get(name, None)
        if value is None:
            return None
        if not (isinstance(value, str) and value):
            raise ConfigError(self.key(name), f"expected a non-empty string, got {value!r}")
        return (base / value).resolve()

    def table(self, name: str) -> Table:
        return Table(self.get(name, {}), self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def listen(value: str, key: str) -> Listen:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not m:
        raise ConfigError(key, f"expected \"host:port\" or \"[v6addr]:port\", got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port < 65536:  # 0: any free port (tests)
        raise ConfigError(key, f"port out of range in {value!r}")
    return Listen(host, port)


def lmtp_target(value: str, key: str, base: Path) -> LMTPTarget:
    """``"unix:/run/dovecot/lmtp"`` (relative paths from the config's folder) or ``"host:port"``."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path:
            raise ConfigError(key, f"expected \"unix:/path/to/socket\", got {value!r}")
        return LMTPTarget((base / path).resolve())
    try:
        where = listen(value, key)
    except ConfigError:
        raise ConfigError(key, f"expected \"unix:/path/to/socket\" or \"host:port\", got {value!r}") from None
    if where.port == 0:
        raise ConfigError(key, f"port 0 in {value!r}")
    return LMTPTarget(None, where.host, where.port)


# A Unix account name as useradd(8) accepts it (NAME_REGEX, with upper case and a
# trailing $ for Samba machine accounts); never a path or an option.
_ACCOUNT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,31}\$?\Z")


def is_account_name(name: str) -> bool:
    return bool(_ACCOUNT_NAME.match(name))


def network(value: str, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(key, f"expected a network such as \"10.0.0.0/8\", got {value!r}") from None


def domain(value: str, key: str) -> str:
    d = value.strip().rstrip(".").lower()
    if not d or not re.fullmatch(r"[a-z0-9_\-.\x80-\U0010ffff]+", d) or ".." in d:
        raise ConfigError(key, f"expected a domain name, got {value!r}")
    return d
