"""`Metrics.sent` counts exactly what `reply_codes` finds, whatever it keeps between calls
(it remembers what each reply string counts, a one-line reply by its first characters)."""

from __future__ import annotations

import collections

from monomail.metrics import Metrics, reply_codes

CASES = ["250 OK", "250-a\r\n250 b", "220", "22", "2500 x", "250\r", "250\r\r", "354 go", "535 5.7.8 no",
         "335 x", b"250 OK", b"535 x\r\n", b"250-x\r\n535 y", "x250 ", "", b"", "250 2.0.0 OK delivered as 1",
         "250 2.0.0 OK delivered as 2", "421 4.3.2 bye\n"]


def counts(m: Metrics) -> dict[str, float]:
    out = {}
    for family in m.registry.collect():
        for s in family.samples:
            if s.name == "monomail_smtp_replies_total":
                out[s.labels["code_class"]] = s.value
            elif s.name == "monomail_auth_failures_total":
                out["auth"] = s.value
    return out


def test_sent_counts_what_reply_codes_finds():
    m = Metrics()
    want: collections.Counter[str] = collections.Counter()
    for _ in range(3):
        for case in CASES:
            m.sent(case)
            for code in reply_codes(case):
                want[f"{code[:1].decode()}xx"] += 1
                want["auth"] += code == b"535"
    assert counts(m) == {k: float(want[k]) for k in ("2xx", "3xx", "4xx", "5xx", "auth")}
