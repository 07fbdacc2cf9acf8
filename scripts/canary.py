"""Canary (`make test-latest`): the test suite on the newest releases that pyproject's ranges allow.

Makes a throwaway venv in a temporary folder, installs biaslens from the working tree with the
newest versions pyproject.toml allows (torch held by constraints.txt to the CPU wheel), runs the
same pytest command as `make test`, then prints which packages differ from requirements.lock and
which tests failed, and deletes the folder. It never fails: the exit status is 0 whatever happens,
the verdict is the closing `CANARY:` line.

Runs on the system python3 with the standard library only (it must not depend on .venv).
Environment:
  PYTEST_ARGS         the `make test` arguments (the Makefile passes its own)
  CANARY_PYTEST_ARGS  extra pytest arguments appended to them, e.g. "tests/integration/test_model.py -x"
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
DEFAULT_PYTEST_ARGS = '-q -m "not slow" --durations=15 -n auto --maxprocesses=4 --dist loadfile'

# Loaded into the canary's pytest with -p: appends each failed test (or collection error) by node id as it
# happens, so a run stopped by a timeout still tells what had failed, and the exit status at the end.
PLUGIN = '''
import json, os
def _write(**row):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: the controller writes each report once
        return
    with open(os.environ["BIASLENS_CANARY_REPORT"], "a") as f:
        f.write(json.dumps(row) + "\\n")
def pytest_runtest_logreport(report):
    if report.failed:
        _write(node=report.nodeid, when=report.when)
def pytest_collectreport(report):
    if report.failed:
        _write(node=report.nodeid or "<collection>", when="collect")
def pytest_sessionfinish(session, exitstatus):
    _write(exitstatus=int(exitstatus), collected=session.testscollected)
'''


class Stopped(Exception):
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def parse_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip()] = version.strip()
    return pins


def package_diff(lock: dict[str, str], latest: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(lock) | set(latest)):
        old, new = lock.get(name), latest.get(name)
        if old != new:
            rows.append(f"{name} {old or '(not in lock)'} -> {new or '(not installed)'}")
    return rows


def read_report(path: Path) -> tuple[list[str], dict | None]:
    """Failed node ids (first failing phase each) and the session's closing row, if it got there."""
    failed: dict[str, str] = {}
    end = None
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "node" in row:
            failed.setdefault(row["node"], row["when"])
        else:
            end = row
    return [node if when == "call" else f"{node} (error in {when})" for node, when in failed.items()], end


def run(cmd: list[str], **kw) -> int:
    say("+ " + " ".join(shlex.quote(str(c)) for c in cmd))
    return subprocess.run([str(c) for c in cmd], **kw).returncode


def canary(tmp: Path, state: dict) -> str:
    venv = tmp / "venv"
    py = venv / "bin" / "python"
    say(f"canary: throwaway venv in {tmp}")
    if run([sys.executable, "-m", "venv", venv]) != 0:
        return "CANARY: could not run: creating the throwaway venv failed (see above)"
    run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    rc = run([py, "-m", "pip", "install", "--quiet", "--upgrade", "-c", REPO / "constraints.txt", "-e", ".[test]"],
             cwd=REPO)
    if rc != 0:
        return f"CANARY: could not install the newest releases (pip exited {rc}; see above)"
    if run([py, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], stdout=subprocess.DEVNULL) != 0:
        return "CANARY: could not run: installing the python3 Jupyter kernel failed (see above)"

    frozen = subprocess.run([py, REPO / "scripts" / "lock.py", "--print"], capture_output=True, text=True)
    if frozen.returncode == 0:
        state["diff"] = package_diff(parse_pins(LOCK.read_text()) if LOCK.exists() else {}, parse_pins(frozen.stdout))
    else:
        state["diff"] = [f"(could not list the newest versions: {frozen.stderr.strip()[-300:]})"]
    say("canary: packages that differ from requirements.lock (lock -> newest):")
    for row in state["diff"] or ["none"]:
        say(f"  {row}")

    (tmp / "canary_plugin.py").write_text(PLUGIN)
    report = tmp / "report.jsonl"
    env = dict(os.environ, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH", "")) if p),
               BIASLENS_CANARY_REPORT=str(report))
    args = shlex.split(os.environ.get("PYTEST_ARGS") or DEFAULT_PYTEST_ARGS)
    args += shlex.split(os.environ.get("CANARY_PYTEST_ARGS", ""))
    state["phase"], state["report"] = "tests", report
    rc = run([py, "-m", "pytest", *args, "-p", "canary_plugin", "-p", "no:cacheprovider"], cwd=REPO, env=env)
    if not report.exists():
        return f"CANARY: could not run the tests on newest releases (pytest exited {rc} without a report; see above)"
    failed, end = read_report(report)
    state["failed"] = failed
    if end is None:
        return f"CANARY: pytest exited {rc} before the end of the session on newest releases (see above)"
    if failed:
        shown = ", ".join(failed[:20]) + (f", and {len(failed) - 20} more" if len(failed) > 20 else "")
        return f"CANARY: {len(failed)} tests failed on newest releases: {shown}"
    if end["exitstatus"] != 0:
        return f"CANARY: no test failed but pytest exited {end['exitstatus']} on newest releases (see above)"
    return f"CANARY: all passed on newest releases ({end['collected']} tests collected)"


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    state: dict = {"diff": None, "failed": [], "phase": "set-up"}
    tmp = Path(tempfile.mkdtemp(prefix="biaslens-canary-"))
    try:
        verdict = canary(tmp, state)
    except (Stopped, KeyboardInterrupt) as e:
        why = "KeyboardInterrupt" if isinstance(e, KeyboardInterrupt) else str(e)
        verdict = f"CANARY: stopped ({why}) during the {state['phase']} on newest releases, no verdict"
        if state.get("report"):
            state["failed"] = read_report(state["report"])[0]
            verdict += f"; {len(state['failed'])} tests had failed by then" + (
                ": " + ", ".join(state["failed"][:20]) if state["failed"] else "")
    except Exception as e:  # the canary reports, it never fails
        verdict = f"CANARY: could not run: {e.__class__.__name__}: {e}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutil.rmtree(tmp, ignore_errors=True)
    say()
    say("==== canary: newest releases allowed by pyproject.toml vs requirements.lock ====")
    if state["diff"] is not None:
        say("packages that differ (lock -> newest):")
        for row in state["diff"] or ["none"]:
            say(f"  {row}")
    if state["failed"]:
        say("failed tests:")
        for node in state["failed"]:
            say(f"  {node}")
    say(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
