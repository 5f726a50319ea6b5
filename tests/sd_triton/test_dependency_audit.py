"""`make audit`'s decisions on canned pip-audit and PyPI documents (no network): which findings are
known, which are new, and which dependencies count as audited."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from sd_triton.dependency_audit import (
    FALLBACK,
    KNOWN_FILE,
    REQUIREMENT_FILES,
    KnownFinding,
    Pin,
    Vuln,
    account,
    load_known,
    needs_fallback,
    read_pins,
    report,
    split_findings,
)

PINS = [Pin("fastapi", "0.165.0"), Pin("pillow", "13.0.0"), Pin("numpy", "1.26.4")]
SKIPPED = "Dependency not found on PyPI and could not be audited: {} ({})"
# what pip-audit prints on this project's machines: every per-version lookup failed
ALL_SKIPPED = {
    "dependencies": [{"name": p.name, "skip_reason": SKIPPED.format(p.name, p.version)} for p in PINS]
}
# what it prints with a working service
AUDITED = {
    "dependencies": [
        {"name": "fastapi", "version": "0.165.0", "vulns": []},
        {
            "name": "Pillow",
            "version": "13.0.0",
            "vulns": [
                {"id": "PYSEC-2099-1", "fix_versions": ["13.0.1"], "aliases": ["CVE-2099-1", "GHSA-aaaa"]},
                {"id": "PYSEC-2099-2", "fix_versions": [], "aliases": []},
            ],
        },
        {"name": "numpy", "version": "1.26.4", "vulns": []},
    ],
    "fixes": [],
}
KNOWN = [KnownFinding("GHSA-aaaa", "pillow", "13.0.0", "decoder we never call", date(2026, 1, 1))]


def _project(latest: str, *vulns: dict[str, object]) -> dict[str, object]:
    return {"info": {"version": latest}, "vulnerabilities": list(vulns)}


def test_pip_audit_findings_split_into_known_by_alias_and_new(capsys: pytest.CaptureFixture[str]) -> None:
    cov = account("gateway image", PINS, AUDITED, {})
    assert set(cov.audited.values()) == {"pip-audit"} and len(cov.audited) == 3 and not cov.skipped
    listed, new = split_findings(cov.vulns, KNOWN)
    assert [v.id for v in listed] == ["PYSEC-2099-1"]  # listed under its GHSA alias
    assert [v.id for v in new] == ["PYSEC-2099-2"]
    assert report([cov], KNOWN, strict=True) == 1  # a new finding fails
    out = capsys.readouterr().out
    assert "KNOWN pillow 13.0.0 PYSEC-2099-1: decoder we never call" in out
    assert "NEW   pillow 13.0.0 PYSEC-2099-2" in out and "WARNING" not in out


def test_a_known_finding_for_another_version_does_not_match() -> None:
    vuln = Vuln("pillow", "13.0.1", "PYSEC-2099-1", ("GHSA-aaaa",))
    assert split_findings([vuln], KNOWN) == ([], [vuln])


def test_when_pip_audit_skips_everything_only_pins_at_the_latest_release_count_as_audited(
    capsys: pytest.CaptureFixture[str],
) -> None:
    projects = {
        "fastapi": _project("0.165.0"),
        "pillow": _project(
            "13.0.0",
            {"id": "PYSEC-2099-1", "aliases": ["GHSA-aaaa"], "fixed_in": [], "withdrawn": None},
            {"id": "PYSEC-2099-3", "aliases": [], "fixed_in": [], "withdrawn": "2099-02-01T00:00:00"},
        ),
        "numpy": _project("2.5.5"),  # pinned 1.26.4: the project JSON says nothing about it
    }
    assert needs_fallback(PINS, ALL_SKIPPED) == {"fastapi", "pillow", "numpy"}
    cov = account("gateway image", PINS, ALL_SKIPPED, projects)
    assert cov.audited == {"fastapi": FALLBACK, "pillow": FALLBACK}
    assert list(cov.skipped) == ["numpy"] and "latest 2.5.5" in cov.skipped["numpy"]
    assert [v.id for v in cov.vulns] == ["PYSEC-2099-1"]  # the withdrawn one is dropped

    assert report([cov], KNOWN, strict=False) == 0  # known finding, one dependency unchecked: a warning
    out = capsys.readouterr().out
    assert "pip-audit itself checked 0 of 3" in out
    assert "audit incomplete: 1 of 3 dependencies could not be checked" in out
    assert "audit: 2/3 checked, 1 known, 0 new" in out
    assert report([cov], KNOWN, strict=True) == 1  # --strict: anything unchecked fails


def test_nothing_reachable_says_the_audit_did_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    cov = account("triton image", PINS, "pip-audit -s osv failed: NameResolutionError", {})
    assert not cov.audited and len(cov.skipped) == 3
    assert all(reason.startswith("pip-audit -s osv failed") for reason in cov.skipped.values())
    assert report([cov], [], strict=False) == 0
    assert "WARNING: audit did not run: 3 of 3 dependencies could not be checked" in capsys.readouterr().out


def test_the_checked_in_files_parse() -> None:
    assert all(isinstance(k, KnownFinding) for k in load_known(KNOWN_FILE))
    for path in REQUIREMENT_FILES.values():
        assert len(read_pins(path)) > 5  # every line pinned with ==, extras allowed


def test_a_bad_known_finding_or_an_unpinned_requirement_is_refused(tmp_path: Path) -> None:
    known = tmp_path / "known.toml"
    known.write_text(
        '[[finding]]\nid = "GHSA-aaaa"\npackage = "pillow"\nversion = "13.0.0"\nreviewed = 2026-01-01\n'
    )
    with pytest.raises(ValueError, match="lacks 'reason'"):
        load_known(known)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("fastapi==0.165.0\nuvicorn[standard]>=0.54\n")
    with pytest.raises(ValueError, match="not pinned"):
        read_pins(requirements)
