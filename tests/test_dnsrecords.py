"""The DNS records to publish (issue 10, acceptance 5): `dnsrecords` as pure functions, and
``monomail dns`` / ``monomail dns --check`` run as commands against a loopback DNS server
that serves exactly what ``monomail dns`` printed."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.zone
import pytest
from conftest import cli, write_config
from peers import DNSServer

from monomail.config import load
from monomail.dnsrecords import DIFFERENT, MISSING, PRESENT, Record, compare, needed, txt_strings, zone_text

RSA = "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 330 + "IDAQAB"
ED = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
DKIM = {"example.test": {"selector": "mail", "key": "dkim/example.test.mail.key",
                         "ed25519_selector": "ed", "ed25519_key": "dkim/example.test.ed.key"}}


def config(tmp_path: Path, **overrides: Any) -> Any:
    return load(write_config(tmp_path, **overrides))


def by_name(plan: Any) -> dict[tuple[str, str, str], Record]:
    return {(r.name, r.type, r.kind): r for r in plan.records}


# -- the records ---------------------------------------------------------------------------


def test_a_local_domain_needs_mx_spf_both_dkim_keys_dmarc_and_the_hosts_address(tmp_path: Path) -> None:
    plan = needed(config(tmp_path, dkim=DKIM), "Example.Test.", {"mail": RSA, "ed": ED})
    r = by_name(plan)
    assert plan.domain == "example.test"
    assert r["example.test", "MX", "mx"].value == "10 mx.example.test"
    assert r["example.test", "TXT", "spf"].value == "v=spf1 mx -all"
    assert r["mail._domainkey.example.test", "TXT", "dkim"].value == RSA
    assert r["ed._domainkey.example.test", "TXT", "dkim"].value == ED
    dmarc = r["_dmarc.example.test", "TXT", "dmarc"]
    assert dmarc.value == "v=DMARC1; p=none; rua=mailto:postmaster@example.test"
    assert "p=quarantine" in dmarc.comment and "p=reject" in dmarc.comment
    assert r["mx.example.test", "TXT", "spf"].value == "v=spf1 a -all"  # HELO name, for bounces
    assert r["mx.example.test", "A", "address"].value == "127.0.0.1"
    assert "loopback" in r["mx.example.test", "A", "address"].comment
    assert not [x for x in plan.records if x.type == "PTR"]
    assert any("PTR not checked for 127.0.0.1 (loopback)" in n and "mx.example.test" in n for n in plan.notes)


def test_a_public_listen_address_gets_its_a_aaaa_and_ptr(tmp_path: Path) -> None:
    cfg = config(tmp_path, server={"listen": ["1.2.3.4:25", "[2001:4860::25]:25"]})
    r = by_name(needed(cfg, "example.test", {}))
    assert r["mx.example.test", "A", "address"].value == "1.2.3.4"
    assert r["mx.example.test", "AAAA", "address"].value == "2001:4860::25"
    assert r["4.3.2.1.in-addr.arpa", "PTR", "ptr"].value == "mx.example.test"
    v6 = ipaddress.ip_address("2001:4860::25").reverse_pointer
    assert r[v6, "PTR", "ptr"].value == "mx.example.test"


def test_listening_on_all_addresses_prints_the_address_record_commented_out(tmp_path: Path) -> None:
    cfg = config(tmp_path, server={"listen": ["0.0.0.0:25", "10.1.2.3:25"]})
    plan = needed(cfg, "example.test", {})
    (a,) = [x for x in plan.records if x.kind == "address"]
    assert a.value == "" and "all addresses" in a.comment and "10.1.2.3 (private" in a.comment
    text = zone_text(plan, cfg.hostname)
    assert "; mx.example.test. 3600 IN A <public IPv4 address of the server>" in text
    assert any("0.0.0.0 (all addresses)" in n and "10.1.2.3 (private)" in n for n in plan.notes)
    # any address of the host counts, from A or AAAA
    assert a.lookups() == (("mx.example.test", "A"), ("mx.example.test", "AAAA"))
    assert compare(a, ["2001:db8::1"]).status == PRESENT
    assert compare(a, []).status == MISSING


def test_a_smarthost_is_allowed_by_spf(tmp_path: Path) -> None:
    r = by_name(needed(config(tmp_path, remote={"smarthost": "smtp.provider.test:587"}), "example.test", {}))
    spf = r["example.test", "TXT", "spf"]
    assert spf.value == "v=spf1 mx a:smtp.provider.test -all"
    assert "include:" in spf.comment
    assert ("mx.example.test", "TXT", "spf") not in r  # the smarthost says HELO, not we
    r = by_name(needed(config(tmp_path, remote={"smarthost": "[192.0.2.7]:25"}), "example.test", {}))
    assert r["example.test", "TXT", "spf"].value == "v=spf1 mx ip4:192.0.2.7 -all"


def test_a_masquerading_only_domain_gets_no_mx_and_a_domain_not_ours_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, masquerade={"domains": ["corp.test"]})
    plan = needed(cfg, "corp.test", {})
    assert not [x for x in plan.records if x.type == "MX"]
    assert any("no MX" in n for n in plan.notes)
    assert any("monomail dkim keygen corp.test" in n for n in plan.notes)
    with pytest.raises(ValueError, match="other.test is not one of our domains"):
        needed(cfg, "other.test", {})


def test_a_long_txt_value_is_cut_into_strings_of_255_octets() -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 600 + '"\\'
    text = txt_strings(value)
    rdata = dns.rdata.from_text(dns.rdataclass.IN, "TXT", text)
    assert [len(s) for s in rdata.strings] == [255, 255, 110]  # type: ignore[attr-defined]
    assert b"".join(rdata.strings).decode() == value  # type: ignore[attr-defined]


def test_the_zone_text_is_read_by_a_zone_file_parser(tmp_path: Path) -> None:
    cfg = config(tmp_path, dkim=DKIM, server={"listen": ["1.2.3.4:25"]})
    plan = needed(cfg, "example.test", {"mail": RSA, "ed": ED})
    zone = dns.zone.from_text(zone_text(plan, cfg.hostname), origin=".", relativize=False, check_origin=False)
    got = {(str(name).rstrip("."), dns.rdatatype.to_text(rds.rdtype)) for name, rds in zone.iterate_rdatasets()}
    assert got == {(r.name, r.type) for r in plan.records}
    dkim = zone.find_rdataset("mail._domainkey.example.test.", "TXT")
    assert b"".join(next(iter(dkim)).strings).decode() == RSA  # type: ignore[attr-defined]


# -- the comparison ------------------------------------------------------------------------


def rec(kind: str, value: str, rtype: str = "TXT", name: str = "example.test") -> Record:
    return Record(name, rtype, value, "", kind)


def test_mx_is_present_when_one_mx_names_our_host() -> None:
    mx = rec("mx", "10 mx.example.test", "MX")
    assert compare(mx, ["20 backup.example.test", "10 MX.Example.Test"]).status == PRESENT
    f = compare(mx, ["10 other.test"])
    assert f.status == DIFFERENT and f.fix == ("replace example.test MX (10 other.test) with: "
                                               "example.test. 3600 IN MX 10 mx.example.test.")
    f = compare(mx, [])
    assert f.status == MISSING and f.fix == "add: example.test. 3600 IN MX 10 mx.example.test."


def test_spf_may_allow_more_but_not_less_and_must_be_one_record() -> None:
    spf = rec("spf", "v=spf1 mx -all")
    assert compare(spf, ["v=spf1 mx a include:_spf.other.test -all", "google-site-verification=x"]).status == PRESENT
    assert compare(spf, ["v=spf1 mx ~all"]).status == DIFFERENT
    assert compare(spf, ["something else"]).status == MISSING
    two = compare(spf, ["v=spf1 mx -all", "v=spf1 a -all"])
    assert two.status == DIFFERENT and two.fix.startswith("keep only one record:") and "2 SPF records" in two.note


def test_dkim_compares_the_key_not_the_spacing() -> None:
    dkim = rec("dkim", RSA, name="mail._domainkey.example.test")
    folded = RSA.replace("; p=", ";p= ").replace("xxxx", "xx xx")
    assert compare(dkim, [folded]).status == PRESENT
    assert compare(dkim, [RSA.replace("xxxx", "yyyy")]).status == DIFFERENT
    assert compare(dkim, [ED]).status == DIFFERENT


def test_dmarc_any_policy_is_present_two_records_are_not() -> None:
    dmarc = rec("dmarc", "v=DMARC1; p=none; rua=mailto:postmaster@example.test", name="_dmarc.example.test")
    f = compare(dmarc, ["v=DMARC1; p=reject"])
    assert f.status == PRESENT and f.note == "policy p=reject"
    assert compare(dmarc, ["v=DMARC1; rua=mailto:x@example.test"]).status == DIFFERENT
    assert compare(dmarc, ["v=DMARC1; p=none", "v=DMARC1; p=reject"]).status == DIFFERENT
    assert compare(dmarc, ["v=spf1 -all"]).status == MISSING


def test_address_and_ptr_are_compared_exactly() -> None:
    assert compare(rec("address", "2001:db8::1", "AAAA"), ["2001:0db8:0::1"]).status == PRESENT
    assert compare(rec("address", "1.2.3.4", "A"), ["1.2.3.5"]).status == DIFFERENT
    ptr = rec("ptr", "mx.example.test", "PTR", "4.3.2.1.in-addr.arpa")
    assert compare(ptr, ["MX.example.test"]).status == PRESENT
    assert compare(ptr, ["host-1-2-3-4.isp.test"]).status == DIFFERENT


# -- the commands --------------------------------------------------------------------------


def load_zone(server: DNSServer, text: str) -> int:
    """Every record line of ``monomail dns`` output into the DNS server; how many."""
    rrsets: dict[tuple[str, str], list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith(";"):
            continue
        name, ttl, klass, rtype, rdata = line.split(None, 4)
        assert klass == "IN" and name.endswith(".") and int(ttl) > 0, line
        rrsets.setdefault((name, rtype), []).append(rdata)
    for (name, rtype), values in rrsets.items():
        server.records(name, rtype, *values)
    return sum(len(v) for v in rrsets.values())


def keygen(cfg: Path, *args: str) -> str:
    out = cli("dkim", "keygen", "example.test", *args, "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def published(tmp_path: Path, dns: DNSServer) -> tuple[Path, str]:
    """A config with RSA and Ed25519 keys made by `monomail dkim keygen`, and the
    records `monomail dns` printed for it, loaded into the test DNS server."""
    (tmp_path / "dkim").mkdir()
    cfg = write_config(tmp_path, dkim=DKIM, dns={"nameservers": [dns.address], "timeout": "2s"})
    rsa = keygen(cfg, "--selector", "mail", "--algorithm", "rsa")
    ed = keygen(cfg, "--selector", "ed", "--algorithm", "ed25519")
    assert "k=rsa" in rsa and "k=ed25519" in ed
    out = cli("dns", "example.test", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert load_zone(dns, out.stdout) == 7  # MX, 2 SPF, 2 DKIM, DMARC, A
    return cfg, out.stdout


def test_acceptance_printed_records_pass_check_and_a_removed_one_is_named(
        published: tuple[Path, str], dns: DNSServer) -> None:
    cfg, _ = published
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for label in ("example.test MX", "example.test TXT (SPF)", "mail._domainkey.example.test TXT (DKIM)",
                  "ed._domainkey.example.test TXT (DKIM)", "_dmarc.example.test TXT (DMARC)",
                  "mx.example.test TXT (SPF)", "mx.example.test A"):
        assert any(line.startswith("present") and label in line for line in lines), (label, out.stdout)
    assert "-- example.test: 7 present, 0 missing, 0 different" in out.stdout
    assert "note: PTR not checked for 127.0.0.1 (loopback)" in out.stdout
    assert not [q for q in dns.queries if q[1] == "PTR"]  # a loopback address's PTR is not asked

    dns.clear("_dmarc.example.test")
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 1
    assert "missing   _dmarc.example.test TXT (DMARC)" in out.stdout
    assert ('fix: add: _dmarc.example.test. 3600 IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.test"'
            in out.stdout)
    assert "6 present, 1 missing, 0 different" in out.stdout


def test_check_reports_a_changed_value_as_different(published: tuple[Path, str], dns: DNSServer) -> None:
    cfg, _ = published
    dns.txt("example.test", "v=spf1 mx ~all")
    dns.txt("mail._domainkey.example.test", ED)  # another key than the one configured
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 1
    assert 'different example.test TXT (SPF): has v=spf1 mx ~all' in out.stdout
    assert 'fix: replace example.test TXT (v=spf1 mx ~all) with: example.test. 3600 IN TXT "v=spf1 mx -all"' \
        in out.stdout
    assert f"different mail._domainkey.example.test TXT (DKIM): has {ED}" in out.stdout
    assert "5 present, 0 missing, 2 different" in out.stdout


def test_check_of_a_public_listen_address_asks_its_ptr(tmp_path: Path, dns: DNSServer) -> None:
    cfg = write_config(tmp_path, server={"listen": ["1.2.3.4:25"]},
                       dns={"nameservers": [dns.address], "timeout": "2s"})
    out = cli("dns", "example.test", "-c", str(cfg))
    assert "4.3.2.1.in-addr.arpa. 3600 IN PTR mx.example.test." in out.stdout
    assert "PTR not checked" not in out.stdout
    load_zone(dns, out.stdout)
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 0, out.stdout
    assert "present   4.3.2.1.in-addr.arpa PTR (mx.example.test)" in out.stdout
    dns.ptr("1.2.3.4", "host-1-2-3-4.isp.test")
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 1
    assert "different 4.3.2.1.in-addr.arpa PTR: has host-1-2-3-4.isp.test" in out.stdout


def test_a_dns_failure_is_reported_and_exits_75(published: tuple[Path, str], dns: DNSServer) -> None:
    cfg, _ = published
    dns.servfail("_dmarc.example.test")
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 75, out.stdout
    assert "unknown   _dmarc.example.test TXT (DMARC): DNS lookup of _dmarc.example.test TXT failed" in out.stdout
    assert "6 present, 0 missing, 0 different, 1 unknown" in out.stdout
    dns.clear("example.test")  # something wrong and something unknown: "fix your DNS" wins
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 1


def test_text_from_the_dns_is_escaped(published: tuple[Path, str], dns: DNSServer) -> None:
    cfg, _ = published
    dns.txt("example.test", "v=spf1 \x1b[31m -all")
    out = cli("dns", "--check", "example.test", "-c", str(cfg))
    assert out.returncode == 1
    assert "\x1b" not in out.stdout and "v=spf1 \\x1b[31m -all" in out.stdout


def test_bad_domain_and_unreadable_key_are_config_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, dkim=DKIM)
    out = cli("dns", "other.test", "-c", str(cfg))
    assert out.returncode == 2 and "other.test is not one of our domains" in out.stderr
    out = cli("dns", "example.test", "-c", str(cfg))
    assert out.returncode == 2
    assert 'dkim."example.test".key: cannot read the DKIM key' in out.stderr and "Traceback" not in out.stderr


def test_dns_without_dkim_prints_the_rest_and_a_note(tmp_path: Path) -> None:
    out = cli("dns", "localhost", "-c", str(write_config(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "; NOTE: no DKIM key for localhost: run `monomail dkim keygen localhost`" in out.stdout
    assert "localhost. 3600 IN MX 10 mx.example.test." in out.stdout
