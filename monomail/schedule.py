"""The retry schedule: when a deferred recipient is tried again.

Job: pure arithmetic over an injected clock value, so retries and give-up are tested
without waiting. ``retry`` is a list of intervals; the last one repeats (Postfix's
backoff between minimal and maximal backoff time, made explicit). `duration` is how
a span of time is written for people (``monomail queue``, bounces).
"""

from __future__ import annotations

from collections.abc import Sequence


def next_attempt(attempts: int, retry: Sequence[float], now: float) -> float:
    """The time of the next try after ``attempts`` failed tries (``attempts`` >= 1)."""
    index = min(max(attempts, 1), len(retry)) - 1
    return now + retry[index]


def expired(received_at: float, give_up_after: float, now: float) -> bool:
    return now - received_at >= give_up_after


def duration(seconds: float) -> str:
    """A duration for people, in its largest whole unit: ``5d``, ``3h``, ``12m``, ``40s``."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"
