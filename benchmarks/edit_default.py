"""Time of a ``biaslens edit`` with no flags, as a user runs it, phase by phase.

For each model the command runs twice in a fresh process, on a fresh key-statistics cache:

1. ``biaslens edit --model M --out OUT`` (nothing else): it measures the model, traces the site,
   estimates the key statistics, tunes λ, the keep weight, the layers and the token role on
   validation templates, edits, measures again and exports;
2. the baseline: the same command with the setting run 1 chose given (``--layers``, ``--role``,
   ``--hparams`` with ``mom2_weight`` / ``keep_weight``), on run 1's cached key statistics, so
   it only measures, edits, measures and exports.

The ratio of the two wall times is what choosing the site and the strength costs. The phases come
from ``report.json`` (``seconds``; LSDM's ``diagnostics.seconds``). Models: the shipped organisms
and a random GPT-2-small-shaped model with the real GPT-2 BPE (12 layers, d_model 768).

    python benchmarks/edit_default.py [--models organism,organism-llama,gpt2-small]
                                      [--threads 2] [--out docs/results/edit_default.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
MODELS = ("organism", "organism-llama", "gpt2-small")


def run_edit(model: str, out: Path, cache: Path, threads: int, extra: list[str]) -> tuple[float, dict]:
    """Wall seconds of one ``biaslens edit`` in its own process, and its report.json."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               BIASLENS_CACHE=str(cache))
    cmd = [sys.executable, "-c", "import sys; from biaslens.cli import main; sys.exit(main())",
           "edit", "--model", model, "--out", str(out), "--quiet", "--cache-dir", str(cache), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"edit_default.py: {' '.join(cmd[3:])} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, json.loads((out / "report.json").read_text())


def phases(report: dict) -> dict[str, float]:
    """Wall seconds by phase: load, measuring, and inside the edit the site map (tracing), key
    statistics, tuning and the final edit."""
    s = dict(report["seconds"])
    lsdm = (report.get("diagnostics") or {}).get("seconds", {})
    inner = {k: float(lsdm[k]) for k in ("site_map", "key_statistics", "tuning") if k in lsdm}
    out = {"load": s["load"], "measure before": s["measure_before"]}
    out.update({k.replace("_", " "): v for k, v in inner.items()})
    out["final edit"] = max(0.0, s["edit"] - sum(inner.values()))
    out["measure after"] = s["measure_after"]
    return out


def chosen(report: dict) -> tuple[list[int], str, float, float, int, int]:
    """The site and strength the tuner chose, the number of candidates it scored and of roles."""
    site, hp = report["site"], report["hyperparameters"]
    tuning = report["diagnostics"].get("tuning", {})
    return (site["layers"], site["role"], hp["mom2_weight"], hp["keep_weight"],
            len(tuning.get("sweep", [])), len(tuning.get("roles", {})) or 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each run (the target is 2 cores)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/edit_default.md"))
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        sys.exit(f"edit_default.py: unknown model {bad[0]!r}; choose from {', '.join(MODELS)}")

    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="biaslens-edit-default-") as tmp:
        tmp = Path(tmp)
        for name in models:
            spec = name
            if name == "gpt2-small":
                from biaslens.testing import gpt2_small

                spec = str(gpt2_small(tmp / "gpt2-small"))
            cache = tmp / f"cov-{name}"
            wall, rep = run_edit(spec, tmp / f"{name}-auto", cache, args.threads, [])
            layers, role, lam, keep, n_cand, n_roles = chosen(rep)
            hp = tmp / f"{name}-hparams.json"
            hp.write_text(json.dumps({"mom2_weight": lam, "keep_weight": keep}))
            fixed = ["--layers", ",".join(map(str, layers)), "--role", role, "--hparams", str(hp)]
            wall0, rep0 = run_edit(spec, tmp / f"{name}-fixed", cache, args.threads, fixed)
            ph = phases(rep)
            cut = rep["summary"].get("contrast_test.mean_abs_contrast", {})
            rows.append((name, f"{wall:.0f} s", f"{wall - ph.get('key statistics', 0.0):.0f} s",
                         f"{wall0:.0f} s", f"{wall / wall0:.1f}",
                         f"L{','.join(map(str, layers))} {role}, λ {lam:g}, keep {keep:g}",
                         f"{n_cand} ({n_roles} role{'s' if n_roles > 1 else ''})"))
            details.append((name, ph, phases(rep0), cut))
            print(f"{name}: no flags {wall:.1f} s, given setting {wall0:.1f} s, ratio {wall / wall0:.2f}",
                  file=sys.stderr)

    head = ("| model | no flags (fresh cache) | no flags, key statistics cached (derived) | "
            "baseline: chosen setting given, statistics cached | ratio | chosen | candidates scored |\n"
            "|---|---|---|---|---|---|---|\n")
    table = head + "".join(f"| {' | '.join(r)} |\n" for r in rows)
    parts = []
    for name, ph, ph0, cut in details:
        keys = list(dict.fromkeys([*ph, *ph0]))
        lines = "".join(f"| {k} | {ph.get(k, 0.0):.1f} | {ph0.get(k, 0.0):.1f} |\n" for k in keys)
        summ = ""
        if cut:
            summ = (f"\n\nHeadline mean |stereotype contrast| on held-out templates (the edit's report): "
                    f"{cut['before']:.4f} → {cut['after']:.4f} (cut {100 * cut['cut']:.0f}%).")
        parts.append(f"### {name}\n\n| phase (wall s) | no flags | chosen setting given |\n|---|---|---|\n"
                     f"{lines.rstrip()}{summ}\n")
    cmd = "python benchmarks/edit_default.py " + " ".join(
        a if not a.startswith(str(ROOT)) else os.path.relpath(a, ROOT) for a in (argv or sys.argv[1:]))
    text = (f"# Time of a no-flag `biaslens edit`\n\nGenerated by `{cmd.strip()}` on "
            f"{os.cpu_count()} CPU core(s), {args.threads} torch thread(s) per run, "
            f"{platform.machine()}, each run in its own process on a fresh key-statistics cache.\n\n"
            f"{table}\n"
            "*No flags* is `biaslens edit --model M --out OUT` as it ships: measure, trace the site, "
            "estimate key statistics (50,000 tokens of general text), tune, edit, measure, export. The "
            "baseline gives the setting the first run chose, so it skips tracing and tuning and reads the "
            "cached statistics. *Statistics cached* subtracts the key-statistics phase from the first run "
            "(a second no-flag edit of the same model reuses the cache).\n\n## Phases\n\n"
            + "\n".join(parts))
    Path(args.out).write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
