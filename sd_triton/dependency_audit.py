"""`make audit`: pip-audit over what ships (the two images' pinned requirement files) and the dev venv.

Fails on a vulnerability that docker/audit-known.toml does not list; reports listed ones as known.

Coverage is counted, not assumed. pip-audit's default service asks PyPI for each pinned version
(`/pypi/<name>/<version>/json`); where that endpoint is unreachable (this project's machines and CI
reach PyPI through a mirror that answers 404 there, and OSV not at all) pip-audit skips every
dependency and still prints "No known vulnerabilities found". So each dependency pip-audit skipped
goes to a fallback: the project-level `/pypi/<name>/json`, whose `vulnerabilities` list is the one of
the latest release, counts as an audit when the pin IS that latest release. Everything else is
reported as not checked, loudly. Not checked is a warning by default (a CI that cannot reach a
per-version vulnerability database would otherwise block every landing); `--strict` makes it a failure,
for machines with full access.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (the [dev] extra)
    import tomli as tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
KNOWN_FILE = ROOT / "docker" / "audit-known.toml"
REQUIREMENT_FILES = {
    "gateway image": ROOT / "docker" / "requirements-gateway.txt",
    "triton image": ROOT / "docker" / "requirements-triton.txt",
}
VENV_LABEL = "dev venv"
PROJECT = "sd-triton"  # the editable install itself: not a PyPI dependency
PYPI_PROJECT_URL = "https://pypi.org/pypi/{name}/json"
FALLBACK = "PyPI latest-release fallback"


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str


@dataclass(frozen=True)
class Vuln:
    package: str
    version: str
    id: str
    aliases: tuple[str, ...] = ()
    fixed_in: tuple[str, ...] = ()

    def ids(self) -> set[str]:
        return {self.id, *self.aliases}


@dataclass(frozen=True)
class KnownFinding:
    id: str
    package: str
    version: str
    reason: str
    reviewed: date

    def matches(self, vuln: Vuln) -> bool:
        return (
            canonicalize_name(self.package) == vuln.package
            and self.version == vuln.version
            and self.id in vuln.ids()
        )


@dataclass
class Coverage:
    """One source's dependencies: who audited each, why the others were not, what was found."""

    label: str
    audited: dict[str, str] = field(default_factory=dict)  # name -> "pip-audit" | FALLBACK
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    vulns: list[Vuln] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.audited) + len(self.skipped)


# 1. what to audit -----------------------------------------------------------------------------------


def load_known(path: Path) -> list[KnownFinding]:
    entries = tomllib.loads(path.read_text()).get("finding", [])
    known = []
    for i, entry in enumerate(entries):
        for key in ("id", "package", "version", "reason", "reviewed"):
            if key not in entry:
                raise ValueError(f"{path.name}: finding #{i + 1} lacks {key!r} (got {sorted(entry)})")
        if not isinstance(entry["reviewed"], date):
            raise ValueError(f"{path.name}: finding #{i + 1} reviewed={entry['reviewed']!r} is not a date")
        known.append(
            KnownFinding(**{k: entry[k] for k in ("id", "package", "version", "reason", "reviewed")})
        )
    return known


def read_pins(requirements: Path) -> list[Pin]:
    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"{requirements.name}: {line!r} is not pinned with ==")
        pins.append(Pin(str(canonicalize_name(req.name)), specs[0].version))
    return pins


def venv_pins() -> list[Pin]:
    pins = {
        str(canonicalize_name(dist.metadata["Name"])): dist.version
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    }
    pins.pop(PROJECT, None)
    return [Pin(name, version) for name, version in sorted(pins.items())]


# 2. ask pip-audit, then PyPI for what it skipped ---------------------------------------------------


def run_pip_audit(source_args: list[str], service: str) -> dict[str, Any] | str:
    """pip-audit's JSON document, or why there is none."""
    cmd = [sys.executable, "-m", "pip_audit", "-f", "json", "--progress-spinner", "off", "-s", service]
    out = subprocess.run(cmd + source_args, capture_output=True, text=True)
    try:
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc
    except json.JSONDecodeError:
        lines = out.stderr.strip().splitlines() or [f"no output, exit {out.returncode}"]
        return f"pip-audit -s {service} failed: {lines[-1][:300]}"


def fetch_project(name: str) -> dict[str, Any] | str:
    """PyPI's project-level JSON, or why there is none."""
    try:
        with urllib.request.urlopen(PYPI_PROJECT_URL.format(name=name), timeout=30) as resp:
            doc: dict[str, Any] = json.load(resp)
            return doc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"PyPI project JSON unreachable ({exc})"


# 3. the decisions (pure: the unit tests drive these) -----------------------------------------------


def _same_release(pinned: str, latest: str) -> bool:
    try:
        return Version(pinned).public == Version(latest).public  # 2.13.0+cpu is the 2.13.0 release
    except InvalidVersion:
        return pinned == latest


def fallback(pin: Pin, project: Mapping[str, Any] | str) -> list[Vuln] | str:
    """The latest release's advisories when the pin is the latest release; otherwise why not."""
    if isinstance(project, str):
        return project
    latest = str(project.get("info", {}).get("version", ""))
    if not _same_release(pin.version, latest):
        return (
            f"pinned {pin.version}, latest {latest}: PyPI's project JSON lists the latest's advisories only"
        )
    return [
        Vuln(pin.name, pin.version, v["id"], tuple(v.get("aliases") or ()), tuple(v.get("fixed_in") or ()))
        for v in project.get("vulnerabilities") or []
        if not v.get("withdrawn")
    ]


def account(
    label: str,
    pins: Iterable[Pin],
    pip_audit: Mapping[str, Any] | str,
    projects: Mapping[str, Mapping[str, Any] | str],
) -> Coverage:
    """Every pin ends up audited (by pip-audit or the fallback) or skipped, with its reason."""
    cov = Coverage(label)
    by_name: dict[str, Mapping[str, Any]] = {}
    if not isinstance(pip_audit, str):
        by_name = {str(canonicalize_name(d["name"])): d for d in pip_audit.get("dependencies", [])}
    for pin in pins:
        dep = by_name.get(pin.name)
        if dep is not None and "vulns" in dep:
            cov.audited[pin.name] = "pip-audit"
            cov.vulns += [
                Vuln(pin.name, dep["version"], v["id"], tuple(v.get("aliases", ())), tuple(v["fix_versions"]))
                for v in dep["vulns"]
            ]
            continue
        why_not = pip_audit if isinstance(pip_audit, str) else "not in pip-audit's output"
        if dep is not None:  # "...could not be audited: numpy (1.26.4)": the pin is said once below
            why_not = re.sub(r": \S+ \([^)]*\)$", "", dep.get("skip_reason", why_not))
        found = fallback(pin, projects.get(pin.name, "not fetched"))
        if isinstance(found, str):
            cov.skipped[pin.name] = f"{why_not}; {found}"
        else:
            cov.audited[pin.name] = FALLBACK
            cov.vulns += found
    return cov


def needs_fallback(pins: Iterable[Pin], pip_audit: Mapping[str, Any] | str) -> set[str]:
    if isinstance(pip_audit, str):
        return {pin.name for pin in pins}
    audited = {canonicalize_name(d["name"]) for d in pip_audit.get("dependencies", []) if "vulns" in d}
    return {pin.name for pin in pins} - audited


def split_findings(vulns: Iterable[Vuln], known: list[KnownFinding]) -> tuple[list[Vuln], list[Vuln]]:
    """(known, new), each vulnerability once even when several sources pin the same version."""
    unique = {(v.package, v.version, v.id): v for v in vulns}.values()
    listed = [v for v in unique if any(k.matches(v) for k in known)]
    return listed, [v for v in unique if not any(k.matches(v) for k in known)]


# 4. the report ---------------------------------------------------------------------------------------


def report(coverages: list[Coverage], known: list[KnownFinding], strict: bool) -> int:
    for cov in coverages:
        by_fallback = sum(how == FALLBACK for how in cov.audited.values())
        print(
            f"{cov.label}: {cov.total} dependencies, {len(cov.audited)} audited "
            f"({len(cov.audited) - by_fallback} by pip-audit, {by_fallback} by the {FALLBACK}), "
            f"{len(cov.skipped)} not checked"
        )
        for name, reason in sorted(cov.skipped.items()):
            print(f"  not checked: {name}: {reason}")
    listed, new = split_findings([v for cov in coverages for v in cov.vulns], known)
    for v in listed:
        reason = next(k for k in known if k.matches(v)).reason
        print(f"KNOWN {v.package} {v.version} {v.id}: {reason}")
    for v in new:
        fix = ", ".join(v.fixed_in) or "no fix released"
        print(f"NEW   {v.package} {v.version} {v.id} (aliases {', '.join(v.aliases) or '-'}; fix: {fix})")
    total = sum(cov.total for cov in coverages)
    skipped = sum(len(cov.skipped) for cov in coverages)
    by_pip_audit = sum(how == "pip-audit" for cov in coverages for how in cov.audited.values())
    if by_pip_audit < total:
        print(
            f"WARNING: pip-audit itself checked {by_pip_audit} of {total} dependencies: its per-version "
            f"vulnerability service did not answer for the others; the {FALLBACK} covered "
            f"{total - skipped - by_pip_audit} of them (pins that are the latest release)"
        )
    if skipped:
        what = "audit did not run" if skipped == total else "audit incomplete"
        print(
            f"WARNING: {what}: {skipped} of {total} dependencies could not be checked because no "
            "vulnerability service answered for their pinned versions (listed above as not checked)"
            + ("" if strict else "; not a failure without --strict")
        )
    print(f"audit: {total - skipped}/{total} checked, {len(listed)} known, {len(new)} new finding(s)")
    return 1 if new or (strict and skipped) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--strict", action="store_true", help="fail when any dependency was not checked")
    parser.add_argument("--service", default="pypi", choices=["pypi", "osv", "esms"], help="pip-audit's -s")
    parser.add_argument("--no-venv", action="store_true", help="only the images' requirement files")
    args = parser.parse_args(argv)
    known = load_known(KNOWN_FILE)

    # 1. the sources: each image's pins, and the venv this interpreter runs in
    sources = {
        label: (read_pins(path), ["-r", str(path), "--no-deps", "--disable-pip"])
        for label, path in REQUIREMENT_FILES.items()
    }
    if not args.no_venv:
        sources[VENV_LABEL] = (venv_pins(), ["--skip-editable"])

    # 2. pip-audit over each, side by side
    with concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:
        futures = {
            label: pool.submit(run_pip_audit, src, args.service) for label, (_, src) in sources.items()
        }
        docs = {label: future.result() for label, future in futures.items()}

    # 3. PyPI's project JSON, once per package, for whatever pip-audit skipped
    names = set().union(*(needs_fallback(pins, docs[label]) for label, (pins, _) in sources.items()))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        projects = dict(zip(sorted(names), pool.map(fetch_project, sorted(names)), strict=True))

    # 4. account for every pin, then report
    coverages = [account(label, pins, docs[label], projects) for label, (pins, _) in sources.items()]
    return report(coverages, known, args.strict)


if __name__ == "__main__":
    sys.exit(main())
