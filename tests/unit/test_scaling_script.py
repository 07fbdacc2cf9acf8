"""The pure parts of benchmarks/scaling.py: the exponent fit, the projections and the page writer
(docs/results/scaling.md) on a small synthetic record; no model is loaded."""

from __future__ import annotations

import importlib.util
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from biaslens.errors import BiasLensError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def S():
    spec = importlib.util.spec_from_file_location("scaling_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_rows(S, e_size=1.3, e_n=0.6, e_len=1.1):
    """Power laws with known exponents on every axis, for two jobs; one failed measurement."""
    rows = []
    for job in ("evaluate", "noise"):
        c = 2.0 if job == "noise" else 0.5
        base = c * (S.nonembedding_params("small") / 1e8) ** e_size
        for shape in S.SHAPES:
            p = S.nonembedding_params(shape)
            rows.append({"job": job, "shape": shape, "n": 10, "seq_len": None, "tokens": 70,
                         "seconds": c * (p / 1e8) ** e_size, "working_mb": 3.0 * (p / 1e6) ** 0.9,
                         "process_peak_mb": 900.0, "axes": ["size"] + (["prompts"] if shape == "small" else [])})
        rows.append({"job": job, "shape": "small", "n": 100, "seq_len": None, "tokens": 700,
                     "seconds": base * 10 ** e_n, "working_mb": 50.0, "process_peak_mb": 950.0,
                     "axes": ["prompts"]})
        for L in (16, 64, 256):
            rows.append({"job": job, "shape": "small", "n": 10, "seq_len": L, "tokens": 10 * L,
                         "seconds": 0.01 * L ** e_len, "working_mb": 20.0, "process_peak_mb": 950.0,
                         "axes": ["seq_len"]})
    rows.append({"job": "evaluate", "shape": "small", "n": 1000, "seq_len": None, "error": "timed out (1500 s)",
                 "axes": ["prompts"]})
    return rows


def test_fit_recovers_a_known_exponent(S):
    xs = [10, 30, 100, 300, 1000]
    assert S.fit(xs, [3.0 * x ** 1.7 for x in xs]) == pytest.approx(1.7, abs=1e-9)
    assert S.fit(xs, [5.0 * x ** -0.4 for x in xs]) == pytest.approx(-0.4, abs=1e-9)
    # a zero, a negative or a non-finite time is left out, not fitted through
    assert S.fit([10, 100, 1000, 10_000], [1.0, 10.0, 0.0, float("nan")]) == pytest.approx(1.0)
    assert S.fit([10], [1.0]) is None and S.fit([10, 10], [1.0, 2.0]) is None


def test_project_follows_the_power_law(S):
    assert S.project(100.0, 2.0, 1.5, 10_000.0) == pytest.approx(2.0 * 100 ** 1.5)
    assert S.project(5.0, 7.0, 0.0, 1e9) == pytest.approx(7.0)
    with pytest.raises(ValueError):
        S.project(0.0, 1.0, 1.0, 10.0)
    with pytest.raises(ValueError):
        S.project(1.0, 1.0, float("nan"), 10.0)


def test_summarise_fits_each_axis_and_projects_7b(S):
    summ = S.summarise(synthetic_rows(S))
    for job in ("evaluate", "noise"):
        e = summ[job]["exp"]
        assert e["size"] == pytest.approx(1.3, abs=1e-9)
        assert e["prompts"] == pytest.approx(0.6, abs=1e-9)
        assert e["seq_len"] == pytest.approx(1.1, abs=1e-9)
        assert summ[job]["exp_mem_size"] == pytest.approx(0.9, abs=1e-9)
        big = summ[job]["largest"]
        assert big["shape"] == "large"
        want = big["seconds"] * (S.SEVEN_B_NONEMB / S.nonembedding_params("large")) ** 1.3
        assert summ[job]["proj_7b_seconds"] == pytest.approx(want)
        # 1000 prompts was not measured for either job (one failed): projected from the 100-prompt row
        hundred = next(r for r in synthetic_rows(S) if r["job"] == job and r["n"] == 100)
        assert summ[job]["proj_1000_seconds"] == pytest.approx(hundred["seconds"] * 10 ** 0.6)


def test_write_labels_projections_and_failures(S, tmp_path):
    out = tmp_path / "scaling.md"
    S.write(synthetic_rows(S), out, "python benchmarks/scaling.py --threads 1", 125.0, 1, "cpu")
    md = out.read_text(encoding="utf-8")
    assert "`python benchmarks/scaling.py --threads 1`" in md and "(2 min wall)" in md
    summary = [l for l in md.splitlines() if l.startswith("| noise |")][0]
    assert "| 1.30 | 0.60 | 1.10 | 0.90 |" in summary and "*projected*" in summary
    # every figure beyond the measured grid says it is projected; the failure says it was not measured
    assert md.count("*projected*") >= 2 + 2 + 1
    assert "not measured: timed out (1500 s)" in md
    rec = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert rec["fits"]["noise"]["exponents"]["size"] == pytest.approx(1.3)
    assert len(rec["rows"]) == len(synthetic_rows(S))
    svg = ET.fromstring(out.with_suffix(".svg").read_text(encoding="utf-8"))
    lines = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert len(lines) == 2 * 3  # two jobs × three axes
    for e in lines:
        for pt in e.get("points").split():
            x, y = map(float, pt.split(","))
            assert math.isfinite(x) and math.isfinite(y) and 0 <= x <= 1100 and 0 <= y <= 400
    assert "](scaling.svg)" in md


def test_grid_is_the_full_one(S):
    pts = S.grid(quick=False)
    assert {p["shape"] for p in pts if "size" in p["axes"]} == {"small", "medium", "large"}
    assert sorted(p["n"] for p in pts if "prompts" in p["axes"]) == [10, 100, 1000]
    assert len([p for p in pts if "seq_len" in p["axes"]]) >= 3
    big = next(p for p in pts if p["n"] == 1000)
    assert not any(S.skipped(j, p) for j in S.JOBS for p in pts)  # every job at every point
    assert S.skipped("noise", big, True) and S.skipped("pcgu_step", big, True)
    assert not S.skipped("evaluate", big, True)
    assert not any(S.skipped(j, p, True) for j in S.JOBS for p in pts if p["n"] <= 100)


def test_bad_arguments_fail_before_any_measurement(S, tmp_path):
    with pytest.raises(BiasLensError, match="unknown jobs"):
        S.main(["--jobs", "noise,warp", "--work", str(tmp_path), "--out", str(tmp_path / "x.md")])
    with pytest.raises(BiasLensError, match="threads"):
        S.main(["--threads", "0", "--work", str(tmp_path), "--out", str(tmp_path / "x.md")])
    with pytest.raises(BiasLensError, match="unknown grid points"):
        S.main(["--points", "small/10/native,huge/10/native", "--work", str(tmp_path), "--out", str(tmp_path / "x.md")])
    assert not (tmp_path / "x.md").exists()


def test_cpu_runs_fit_cpu_seconds_and_gpu_runs_wall_time(S):
    rows = synthetic_rows(S)
    for r in rows:  # wall time inflated by other jobs' load in proportion to x²; the CPU time is clean
        if "seconds" in r:
            r["cpu_seconds"], r["device"] = r["seconds"], "cpu"
            r["seconds"] = r["seconds"] * (1 + S.x_of(r, r["axes"][0]) ** 0.5)
    assert S.time_key(rows) == "cpu_seconds"
    assert S.summarise(rows)["noise"]["exp"]["size"] == pytest.approx(1.3, abs=1e-9)
    for r in rows:
        if "seconds" in r:
            r["device"] = "cuda"
    assert S.time_key(rows) == "seconds"
    assert S.summarise(rows)["noise"]["exp"]["size"] != pytest.approx(1.3, abs=1e-3)


def test_a_later_run_replaces_a_jobs_rows_and_says_why(S, tmp_path):
    first = synthetic_rows(S)
    for r in first:
        if r["job"] == "noise" and r["n"] == 100:
            r.pop("seconds"), r.pop("working_mb")
            r["error"] = "child exited 1: boom"
    second = [dict(r, seconds=2 * r["seconds"]) for r in synthetic_rows(S) if r["job"] == "noise"]
    rows, note = S.merge_runs([{"command": "python benchmarks/scaling.py --threads 1", "wall_s": 600, "rows": first},
                               {"command": "python benchmarks/scaling.py --threads 1 --jobs noise", "wall_s": 120,
                                "rows": second}])
    noise = [r for r in rows if r["job"] == "noise"]
    assert len(noise) == len(second) and all(r["run"] == 1 and "error" not in r for r in noise)
    assert all(r["run"] == 0 for r in rows if r["job"] == "evaluate")
    assert "`python benchmarks/scaling.py --threads 1 --jobs noise` (2 min wall) for noise" in note
    assert "failed in the first run: noise (1 point) — child exited 1: boom" in note
    S.write(rows, tmp_path / "s.md", note, 720, 1, "cpu", several=True)
    md = (tmp_path / "s.md").read_text(encoding="utf-8")
    assert md.count("Measured in several runs") == 1 and "boom" in md
