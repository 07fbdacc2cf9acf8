"""Output folders: one policy for every command (:mod:`biaslens.outdir`).

Bad ``--out`` values end in exit 2 and one line on stderr before any model loads, and nothing a
user wrote changes; ``--force`` replaces only a folder biaslens wrote; interrupted runs leave no
temporary folder and never block the next one; processes sharing the key-statistics cache do
not race, and a damaged cache entry is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import biaslens
from biaslens import io as outdir
from biaslens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = ("export", "edit", "unlearn", "locate", "demo")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from biaslens import organism
    from biaslens.testing import tiny_model

    d = tmp_path_factory.mktemp("bad_output")
    model = tiny_model("gpt2", d / "gpt2", n_layers=2)
    corpus = d / "general.txt"
    corpus.write_text("\n".join(organism.generate_general_text(seed=4, n_lines=60)) + "\n")
    hp = d / "hp.json"
    hp.write_text(json.dumps({"cov_tokens": 300, "cov_seq_len": 32, "v_steps": 2,
                              "v_newton_steps": 1, "mom2_weight": 1e-3}))
    written = d / "written"  # a folder biaslens wrote (an export), copied by the tests
    assert main(["export", "--model", str(model), "--out", str(written)]) == 0
    return SimpleNamespace(model=str(model), root=d, corpus=corpus, hp=hp,
                           cache=d / "cache", written=written)


@pytest.fixture(scope="module")
def tiny(env):
    return biaslens.load(env.model)


@pytest.fixture
def no_load(monkeypatch):
    """Refusals must come before any model loads."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(biaslens, "load", boom)


@pytest.fixture
def quick_cache(env, monkeypatch):
    monkeypatch.setenv("BIASLENS_CACHE", str(env.cache))  # demo's key statistics stay in the test


def argv(cmd: str, env, out, *extra) -> list[str]:
    m = env.model
    base = {
        "export": ["export", "--model", m],
        "edit": ["edit", "--model", m, "--layers", "0", "--role", "last", "--hparams", str(env.hp),
                 "--corpus", str(env.corpus), "--cache-dir", str(env.cache), "--max-prompts", "4",
                 "--limit", "4", "--quiet"],
        "unlearn": ["unlearn", "--method", "masked-ascent", "--model", m, "--max-steps", "1",
                    "--max-prompts", "4", "--limit", "4", "--ppl-bound", "1000"],
        "locate": ["locate", "--model", m, "--max-prompts", "4", "--samples", "2", "--components", "mlp"],
        "demo": ["demo", "--model", m, "--max-prompts", "4", "--edit-prompts", "4", "--limit", "4"],
    }[cmd]
    return [*base, "--out", str(out), *extra]


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (and its own listing), to compare before and after."""
    out = {"<listing>": repr(sorted(p.name for p in folder.iterdir()))}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, args, *needles) -> str:
    capsys.readouterr()
    rc = main(args)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def user_folder(root: Path, name: str = "mine") -> Path:
    d = root / name
    d.mkdir()
    (d / "notes.txt").write_text("precious, not written by biaslens\n")
    return d


def no_temp_left(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if outdir.is_stale_name(p.name) or ".probe-" in p.name]
    assert not left, left


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("cmd", COMMANDS)
def test_force_never_replaces_a_users_folder(cmd, env, tmp_path, capsys, no_load):
    d = user_folder(tmp_path)
    before = tree(d)
    line = refused(capsys, argv(cmd, env, d, "--force"), "did not write", "notes.txt", "--out")
    assert tree(d) == before and str(d) in line
    refused(capsys, argv(cmd, env, d), "not empty", "--force")  # and without --force
    assert tree(d) == before
    no_temp_left(tmp_path)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_force_refuses_a_biaslens_folder_the_user_added_to(cmd, env, tmp_path, capsys, no_load):
    d = tmp_path / "run"
    shutil.copytree(env.written, d)
    (d / "my-notes.md").write_text("mine\n")
    before = tree(d)
    refused(capsys, argv(cmd, env, d, "--force"), "did not write", "my-notes.md")
    assert tree(d) == before


@pytest.mark.parametrize("cmd", COMMANDS)
def test_out_is_a_file(cmd, env, tmp_path, capsys, no_load):
    f = tmp_path / "results"
    f.write_text("a user's file\n")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    for extra in ((), ("--force",)):
        refused(capsys, argv(cmd, env, f, *extra), "is a file", "--out")
        assert hashlib.sha256(f.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("where", [".", "..", "here"])
def test_out_is_the_current_folder_or_holds_it(cmd, where, env, tmp_path, capsys, no_load, monkeypatch):
    here = user_folder(tmp_path, "work")
    monkeypatch.chdir(here)
    out = {".": ".", "..": "..", "here": str(here)}[where]
    before = tree(tmp_path)
    refused(capsys, argv(cmd, env, out, "--force"), "current folder", "subfolder")
    assert tree(tmp_path) == before


def _can_write(folder: Path) -> bool:
    try:
        (folder / ".w").write_text("x")
    except OSError:
        return False
    (folder / ".w").unlink()
    return True


@pytest.fixture
def unwritable(tmp_path):
    """A folder no file can be created in: chmod 0o500, or (as root, where chmod does not stop
    writes) a read-only system folder such as /sys."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not _can_write(ro):
            yield ro
            return
        for cand in (Path("/sys"), Path("/proc")):
            if cand.is_dir() and not _can_write(cand):
                yield cand
                return
        pytest.skip("running as root and no read-only folder found: chmod does not stop root")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unwritable_parent(cmd, env, unwritable, capsys, no_load):
    out = unwritable / "biaslens-test-out"
    refused(capsys, argv(cmd, env, out), "cannot write", "writable")
    assert not out.exists()


@pytest.mark.parametrize("force", [False, True])
def test_edit_refuses_out_model_being_a_file(force, env, tmp_path, capsys, no_load):
    d = tmp_path / "run"
    d.mkdir()
    (d / "model").write_text("not a folder\n")
    before = tree(d)
    refused(capsys, argv("edit", env, d, *(["--force"] if force else [])),
            "did not write" if force else "not empty")
    assert tree(d) == before


def test_evaluate_output_files_are_checked_before_loading(env, tmp_path, capsys, no_load):
    ev = ["evaluate", "--model", env.model, "--benchmarks", "crows", "--limit", "4"]
    refused(capsys, [*ev, "--json", str(tmp_path / "missing" / "x.json")], "does not exist", "missing")
    assert not (tmp_path / "missing").exists()
    refused(capsys, [*ev, "--json", str(tmp_path)], "is a folder")
    refused(capsys, [*ev, "--json", str(tmp_path / "x.json"), "--html", str(tmp_path / "no" / "x.html")],
            "--html", "does not exist")
    (tmp_path / "x.json").write_text("{}")
    refused(capsys, [*ev, "--json", str(tmp_path / "x.json")], "exists", "--force")
    assert (tmp_path / "x.json").read_text() == "{}"


def test_library_export_refuses_like_the_cli(env, tmp_path):
    d = user_folder(tmp_path)
    before = tree(d)
    with pytest.raises(biaslens.errors.BiasLensError, match="did not write"):
        outdir.prepare(d, force=True)
    with pytest.raises(biaslens.errors.BiasLensError, match="not empty"):
        outdir.prepare(d)
    assert tree(d) == before


# --------------------------------------------------------------------- what --force replaces


@pytest.mark.parametrize("cmd", COMMANDS)
def test_force_replaces_a_folder_biaslens_wrote(cmd, env, tmp_path, capsys, quick_cache):
    d = tmp_path / "run"
    shutil.copytree(env.written, d)
    (d / ".model.tmp-4242-abcd").mkdir()  # a stale entry of an interrupted run does not count
    assert main(argv(cmd, env, d, "--force")) == 0, capsys.readouterr().err
    mark = outdir.read_marker(d)
    assert mark and mark["command"] == cmd and not outdir.foreign_files(d)
    expected = {"export": "model.safetensors", "edit": "report.json", "unlearn": "report.json",
                "locate": "effects.json", "demo": "report.html"}[cmd]
    assert (d / expected).is_file()
    if cmd in ("edit", "locate", "demo"):  # the old export's files went with the old folder
        assert not (d / "model.safetensors").exists()
    if cmd in ("edit", "demo"):
        assert (outdir.read_marker(d / "model") or {}).get("command") == "export"
    no_temp_left(tmp_path)
    # and biaslens's own output is refused without --force
    refused(capsys, argv(cmd, env, d), "not empty", "--force")


def test_stale_temp_folder_does_not_block_edit(env, tmp_path, capsys):
    d = tmp_path / "run"
    (d / ".model.tmp-123").mkdir(parents=True)
    (d / ".model.tmp-123" / "config.json").write_text("{")  # half-written by a killed run
    stale_beside = tmp_path / ".run.tmp-4194399-zzzz"  # an ended run's staging folder (no such pid)
    stale_beside.mkdir()
    old = time.time() - 3600
    os.utime(stale_beside, (old, old))
    assert main(argv("edit", env, d)) == 0, capsys.readouterr().err
    assert (d / "model" / "config.json").is_file() and (d / "report.json").is_file()
    assert not (d / ".model.tmp-123").exists()
    no_temp_left(tmp_path)


# ------------------------------------------------------------------- interrupted writes


def test_exception_and_sigterm_during_export_leave_no_temp_folder(tiny, tmp_path, monkeypatch):
    import biaslens.export as ex

    m = tiny
    prev = signal.getsignal(signal.SIGTERM)
    for how in ("error", "interrupt", "sigterm"):
        def stop(*a, **k):
            if how == "error":
                raise RuntimeError("disk full")
            if how == "interrupt":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
            time.sleep(5)
            raise AssertionError("SIGTERM was not turned into an exception")

        monkeypatch.setattr(ex, "_verify", stop)
        with pytest.raises((RuntimeError, KeyboardInterrupt, SystemExit)) as info:
            ex.export(m, tmp_path / "out")
        if how == "sigterm":
            assert info.type is outdir.Terminated and info.value.code == 128 + signal.SIGTERM
        assert not (tmp_path / "out").exists()
        no_temp_left(tmp_path)
        assert signal.getsignal(signal.SIGTERM) == prev  # the previous handler is back


def test_sigterm_kills_a_writer_cleanly(tmp_path):
    """A real process killed with SIGTERM while it writes: no temporary folder stays, and a
    replaced folder is kept as it was."""
    out = tmp_path / "out"
    out.mkdir()
    code = textwrap.dedent(f"""
        import sys, time
        from biaslens.io import staging
        with staging({str(out)!r}, force=False, command="test") as tmp:
            (tmp / "part.bin").write_bytes(b"x" * 1000)
            print("WRITING", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "WRITING", p.stderr.read()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
    finally:
        p.kill()
    assert rc == 128 + signal.SIGTERM
    assert out.is_dir() and not list(out.iterdir())
    no_temp_left(tmp_path)


# -------------------------------------------------------------------- key-statistics cache


def test_two_processes_share_a_cache(env, tmp_path):
    """Both compute the same statistics at once (a fixed temporary name made one fail with
    FileNotFoundError); both succeed and the cache holds one valid entry per layer."""
    cache = tmp_path / "cache"
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        import safetensors.torch as st
        import biaslens
        from biaslens.edit.covariance import key_covariances
        real = st.save_file
        def slow(*a, **k):  # hold each write open so the two processes' writes overlap
            real(*a, **k)
            time.sleep(0.5)
        st.save_file = slow
        m = biaslens.load({env.model!r})
        me, other = Path({str(tmp_path)!r}) / f"ready-{{sys.argv[1]}}", Path({str(tmp_path)!r}) / f"ready-{{1 - int(sys.argv[1])}}"
        me.touch()
        t = time.time()
        while not other.exists() and time.time() - t < 60:
            time.sleep(0.01)
        c = key_covariances(m, [0, 1], {str(env.corpus)!r}, n_tokens=200, seq_len=32,
                            cache_dir={str(cache)!r}, progress=False)
        print(float(c[0].sum()), float(c[1].sum()))
    """)
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env_vars) for i in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e
    assert outs[0][0] == outs[1][0]  # the same statistic
    files = sorted(f.name for f in cache.iterdir())
    assert len(files) == 2 and all(f.endswith(".safetensors") and not f.startswith(".") for f in files)
    import torch

    from biaslens.edit.covariance import load_cached

    d_mlp = 4 * json.loads((Path(env.model) / "config.json").read_text())["n_embd"]
    for f in cache.iterdir():
        assert load_cached(f, "second_moment", (d_mlp, d_mlp), torch.float64) is not None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "shape"])
def test_damaged_cache_entry_is_recomputed_with_a_warning(damage, env, tiny, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from biaslens.edit.covariance import key_covariances, load_cached

    m = tiny
    kw = dict(n_tokens=200, seq_len=32, cache_dir=tmp_path, progress=False)
    ref = key_covariances(m, [1], env.corpus, **kw)[1]
    (f,) = list(tmp_path.glob("*.safetensors"))
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # the header intact, the numbers wrong: the checksum catches it
        f.write_bytes(raw[:-8] + bytes(8))
    elif damage == "garbage":
        f.write_bytes(b"\x00" * 64)
    else:
        save_file({"second_moment": torch.zeros(3, 3, dtype=torch.float64)}, str(f))
    capsys.readouterr()
    again = key_covariances(m, [1], env.corpus, **kw)[1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recomputing" in err[0] and f.name in err[0], err
    assert torch.equal(again, ref)
    got = load_cached(f, "second_moment", tuple(ref.shape), torch.float64)  # rewritten whole
    assert got is not None and torch.equal(got, ref)
    key_covariances(m, [1], env.corpus, **kw)
    assert not capsys.readouterr().err.strip()  # and read back silently afterwards
