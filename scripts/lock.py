"""Freeze the current environment into requirements.lock (run by `make lock`).

Run it with the environment's own interpreter (`.venv/bin/python scripts/lock.py`). It writes every
installed distribution as `name==version`, sorted by normalised name, so the same environment always
gives the same file. Left out: biaslens itself (installed from the working tree with --no-deps) and
the installer tools pip and wheel. setuptools stays when something installed requires it (torch
does), since a fresh venv's bundled copy would otherwise be replaced by whatever is newest.
Local version labels are dropped (`torch==2.13.0+cpu` -> `torch==2.13.0`): `==2.13.0` matches the
CPU wheel where the index offers it, and `constraints.txt` pins the same version.

Before writing, it checks that the environment is consistent (`pip check`) and that every
requirement of pyproject.toml's [project] dependencies and test extras is installed and inside its
range, so the lock can never contradict the ranges it is meant to satisfy.

`--print` writes the freeze to stdout instead and skips the checks (the canary uses it to list what
its throwaway environment resolved to).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SELF = "biaslens"
INSTALLER_TOOLS = {"pip", "wheel"}
HEADER = """\
# Every package of the biaslens environment at an exact version: written by `make lock`
# (scripts/lock.py) from .venv, to be re-run only once `make test` passes there. `make setup`
# installs this file, then biaslens itself with --no-deps. Not edited by hand.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Normalised name -> version of every distribution on sys.path (the first one wins, as for imports)."""
    found: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def required_names() -> set[str]:
    """Normalised names that some installed distribution requires (markers evaluated, extras ignored)."""
    from packaging.requirements import Requirement

    names: set[str] = set()
    for dist in md.distributions():
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                names.add(canonical(req.name))
    return names


def freeze(keep_setuptools: bool) -> list[str]:
    lines = []
    for name, version in sorted(installed().items()):
        if name == SELF or name in INSTALLER_TOOLS or (name == "setuptools" and not keep_setuptools):
            continue
        lines.append(f"{name}=={version.split('+', 1)[0]}")
    return lines


def check_pyproject(versions: dict[str, str]) -> list[str]:
    """Problems with pyproject's dependencies and test extras against the installed versions."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("test", []))
    problems = []
    for spec in specs:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue
        have = versions.get(canonical(req.name))
        if have is None:
            problems.append(f"{req.name} is required ({spec}) but not installed")
        elif not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} is outside pyproject's range ({spec})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="write the freeze to stdout; no checks")
    parser.add_argument("--out", default=str(REPO / "requirements.lock"))
    args = parser.parse_args()

    if args.print:
        print("\n".join(freeze(keep_setuptools="setuptools" in required_names())))
        return 0

    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [] if check.returncode == 0 else [line for line in check.stdout.splitlines() if line.strip()]
    problems += check_pyproject(installed())
    if problems:
        print("lock: the environment does not satisfy its requirements, nothing written:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1

    lines = freeze(keep_setuptools="setuptools" in required_names())
    out = Path(args.out)
    text = HEADER + "\n".join(lines) + "\n"
    old = out.read_text() if out.exists() else None
    out.write_text(text)
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"lock: {shown}: {len(lines)} packages, {'unchanged' if old == text else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
