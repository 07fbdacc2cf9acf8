"""How the cost of each biaslens job grows: with model size, number of prompts and sequence length.

Jobs: noise tracing of the MLPs, attribution patching, the LSDM edit (key statistics cached and
not cached), occupational-bias evaluation, and one PCGU step. Models: GPT-2 small, medium and large
shapes (12 × 768, 24 × 1024, 36 × 1280) with random weights and the real GPT-2 BPE. Each
measurement runs in a fresh child process so its peak RSS (``ru_maxrss``) is its own; memory is
reported as the job's peak over the RSS the process had once the model was loaded ("working
memory") and as the total peak.

Axes (the other two held at their base value: GPT-2 small, 10 prompts, native prompt length ≈ 10
tokens):

- model size: small, medium, large;
- prompts: 10, 100, 1000 (noise tracing: 10 and 100 only, 1000 projected — on 2 CPU cores it
  would take most of an hour);
- sequence length: each prompt prefixed with general text to 16, 64 and 256 tokens.

For every job and axis, a least-squares fit of log(time) on log(x) gives the exponent; the fit
projects a 7B-parameter LLaMA-shaped model (from non-embedding parameter count), printed next to
the measured rows and labelled *projected*.

    python benchmarks/scaling.py [--out docs/results/scaling.md] [--quick] [--threads 2]

``--quick`` measures a reduced grid (small/medium, 10/100 prompts, 16/64 tokens) to check the
script end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}
JOBS = ("noise", "attribution", "lsdm_uncached", "lsdm_cached", "evaluate", "pcgu_step")
#: a LLaMA-2-7B-shaped model's non-embedding parameters (32 layers, d 4096, MLP 11008)
SEVEN_B_NONEMB = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
COV_TOKENS = 4096
CHILD_TIMEOUT = 1500


def nonembedding_params(shape: str) -> int:
    n_layer, d, _ = SHAPES[shape]
    return n_layer * 12 * d * d


def rss_mb() -> float:
    """Current resident set size (MB), from /proc when it exists, else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_mb()


def peak_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ------------------------------------------------------------------------------ one measurement
def build_model(shape: str, folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from biaslens.testing import gpt2_tokenizer

    if (folder / "config.json").exists():
        return folder
    n_layer, d, heads = SHAPES[shape]
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, vocab_size=len(tok),
                                   n_positions=1024))
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prompts_for(model, n: int, seq_len: int | None):
    import dataclasses

    from biaslens.defaults import balanced_sample, defaults_for

    d = defaults_for(model)
    base = balanced_sample(d.occupation_prompts("all", "all"), n, seed=0)
    if len(base) < n:  # more prompts than the bank has: repeat it
        base = (base * math.ceil(n / len(base)))[:n]
    if not seq_len:
        return base
    words = " ".join(d.general_lines(200, part="ppl")).split()
    out = []
    for i, p in enumerate(base):
        need = seq_len - len(model.tokenize([p.text])[0])
        prefix, j = "", i * 37 % max(1, len(words) - 400)
        while len(model.tokenize([prefix])[0]) < need and j < len(words):
            prefix = (prefix + " " + words[j]).strip()
            j += 1
        while prefix and len(model.tokenize([prefix + ". " + p.text])[0]) > seq_len:
            prefix = prefix.rsplit(" ", 1)[0] if " " in prefix else ""
        text = (prefix + ". " + p.text) if prefix else p.text
        out.append(dataclasses.replace(p, text=text))
    return out


def run_job(job: str, model, prompts, work: Path) -> dict:
    """Run ``job`` once; returns extra facts about it (the caller times it)."""
    import inspect

    import torch

    if job == "noise":
        from biaslens.locate import locate

        emap = locate(model, prompts, method="noise", components=("mlp",), n_samples=2, max_prompts=None)
        return {"sites": int(len(emap.layers) * len(emap.roles))}
    if job == "attribution":
        from biaslens.locate import locate

        emap = locate(model, prompts, method="attribution", components=("mlp",), max_prompts=None)
        return {"sites": int(len(emap.layers) * len(emap.roles))}
    if job == "evaluate":
        from biaslens.evaluate import occupational_bias

        occupational_bias(model, prompts)
        return {}
    if job.startswith("lsdm"):
        from biaslens.edit.least_squares import lsdm

        kw = dict(layers=[model.n_layers // 2], role="last", keep_prompts=[], progress=False,
                  hparams={"cov_tokens": COV_TOKENS, "cov_seq_len": 128, "v_steps": 0},
                  cache_dir=work / f"cov-{os.getpid()}")  # this process's own: never a warm cache
        if "tune" in inspect.signature(lsdm).parameters:
            kw["tune"] = "off"
        if job == "lsdm_cached":  # fill the cache (untimed by the caller: it times the second run)
            lsdm(model, prompts, **kw).undo(model)
            t0 = time.perf_counter()
            lsdm(model, prompts, **kw).undo(model)
            return {"timed_inside": time.perf_counter() - t0}
        lsdm(model, prompts, **kw).undo(model)
        return {"cov_tokens": COV_TOKENS}
    if job == "pcgu_step":
        from biaslens.unlearn.pairs import pronoun_pairs
        from biaslens.unlearn.pcgu import pcgu

        pairs = pronoun_pairs(prompts, source="scaling benchmark")
        delta = pcgu(model, pairs, k=1000, lr=1e-5, batch_size=len(pairs), max_steps=1, progress=False)
        delta.undo(model)
        return {"batch": len(pairs)}
    raise ValueError(job)


def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    import biaslens

    work = Path(args.work)
    folder = build_model(args.shape, work / f"gpt2-{args.shape}")
    rss0 = rss_mb()
    model = biaslens.load(str(folder))
    prompts = prompts_for(model, args.n, args.seq_len)
    n_tokens = sum(len(r) for r in model.tokenize([p.text for p in prompts]))
    rss_loaded = rss_mb()
    t0 = time.perf_counter()
    extra = run_job(args.job, model, prompts, work)
    seconds = extra.pop("timed_inside", time.perf_counter() - t0)
    peak = peak_mb()
    print(json.dumps({"job": args.job, "shape": args.shape, "n": args.n, "seq_len": args.seq_len,
                      "tokens": n_tokens, "seconds": seconds, "peak_mb": peak,
                      "working_mb": max(0.0, peak - rss_loaded), "model_mb": rss_loaded - rss0, **extra}))
    return 0


# ------------------------------------------------------------------------------ the grid
def measure(job, shape, n, seq_len, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--job", job, "--shape", shape, "--n", str(n),
           "--threads", str(args.threads), "--work", str(args.work)]
    if seq_len:
        cmd += ["--seq-len", str(seq_len)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return {"job": job, "shape": shape, "n": n, "seq_len": seq_len, "error": f"timed out ({CHILD_TIMEOUT} s)"}
    line = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode != 0 or not line:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"job": job, "shape": shape, "n": n, "seq_len": seq_len, "error": tail[:200]}
    row = json.loads(line[-1])
    print(f"  {job:<14} {shape:<7} n={n:<5} len={seq_len or 'native':<6} {row['seconds']:8.2f} s  "
          f"peak {row['peak_mb']:7.0f} MB  working {row['working_mb']:6.0f} MB  "
          f"(child {time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def fit(xs, ys) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


DOMINATES = {
    "noise": "one corrupted-and-restored forward per (layer, role) site and noise sample, so layers × sites × prompts",
    "attribution": "a fixed three passes (clean forward, corrupted forward and backward) whatever the number of sites",
    "lsdm_uncached": "the key statistics: a forward over the general text up to the edited layer, then a d_mlp² accumulation",
    "lsdm_cached": "the target optimisation and the solve; with cached statistics the general text is never read",
    "evaluate": "one forward per prompt batch",
    "pcgu_step": "two forward+backward passes (both sides of every pair) and per-unit gradient statistics",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "scaling.md"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="biaslens-scaling-")
        args.work = tmp.name
    jobs = [j for j in args.jobs.split(",") if j]
    shapes = ["small", "medium"] if args.quick else list(SHAPES)
    counts = [10, 100] if args.quick else [10, 100, 1000]
    lengths = [16, 64] if args.quick else [16, 64, 256]
    started = time.time()
    rows = []
    for job in jobs:
        print(f"{job}:", flush=True)
        for shape in shapes:
            rows.append(dict(measure(job, shape, 10, None, args), axis="size"))
        for n in counts:
            if job == "noise" and n > 100:
                continue  # projected from the fit (see the docstring)
            if n == 10:
                rows.append(dict(next(r for r in rows if r["job"] == job and r.get("shape") == "small"
                                      and r["axis"] == "size"), axis="prompts"))
                continue
            rows.append(dict(measure(job, "small", n, None, args), axis="prompts"))
        for L in lengths:
            rows.append(dict(measure(job, "small", 10, L, args), axis="seq_len"))
    write(rows, args, time.time() - started)
    if tmp is not None:
        tmp.cleanup()
    return 0


def write(rows, args, wall) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# How the cost grows (`benchmarks/scaling.py`)",
        "",
        f"Measured in one run of `python benchmarks/scaling.py{' --quick' if args.quick else ''} --threads {args.threads}` "
        f"({wall / 60:.0f} min) on a {os.cpu_count()}-core CPU machine, torch threads {args.threads}, each "
        "measurement in a fresh process. GPT-2 shapes with random weights and the real GPT-2 BPE. "
        "Peak = the process's peak RSS; working = peak minus the RSS once the model was loaded. "
        "Other jobs shared the machine, so wall times are rough; exponents come from log-log fits.",
        "",
    ]
    summary = ["| job | exponent vs parameters | exponent vs prompts | exponent vs tokens per prompt | "
               "measured GPT-2 large | **projected 7B (this CPU)** | what dominates |",
               "|---|---|---|---|---|---|---|"]
    fits = {}
    for job in dict.fromkeys(r["job"] for r in rows):
        mine = [r for r in rows if r["job"] == job and "seconds" in r]
        size = [r for r in mine if r["axis"] == "size"]
        e_size = fit([nonembedding_params(r["shape"]) for r in size], [r["seconds"] for r in size])
        pr = [r for r in mine if r["axis"] == "prompts"]
        e_n = fit([r["n"] for r in pr], [r["seconds"] for r in pr])
        sl = [r for r in mine if r["axis"] == "seq_len"]
        e_len = fit([r["tokens"] / r["n"] for r in sl], [r["seconds"] for r in sl])
        big = max(size, key=lambda r: nonembedding_params(r["shape"]), default=None)
        proj = None
        if big and e_size is not None:
            proj = big["seconds"] * (SEVEN_B_NONEMB / nonembedding_params(big["shape"])) ** e_size
        fits[job] = (e_size, e_n, e_len)
        f = lambda e: "—" if e is None else f"{e:.2f}"
        measured = "—" if not big else f"{big['seconds']:.1f} s ({big['shape']})"
        projected = "—" if proj is None else f"{proj:,.0f} s (projected)"
        summary.append(f"| {job} | {f(e_size)} | {f(e_n)} | {f(e_len)} | {measured} | {projected} | "
                       f"{DOMINATES.get(job, '')} |")
        if job == "noise" and e_n is not None:
            base = next((r for r in pr if r["n"] == 100), None)
            if base:
                summary.append(f"| noise, 1000 prompts | | | | | {base['seconds'] * 10 ** e_n:,.0f} s "
                               "(projected from 10 → 100) | not measured: see the docstring |")
    lines += ["## Summary", ""] + summary + ["",
              "Projected 7B rows scale the largest measured shape by (7B non-embedding parameters / "
              "its own)^exponent on this CPU; they are projections, not measurements, and a GPU changes "
              "the constant, not the exponent's meaning.", "", "## Measured rows", "",
              "| job | axis | shape | prompts | tokens/prompt | seconds | peak MB | working MB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['job']} | {r['axis']} | {r['shape']} | {r['n']} | {r.get('seq_len') or 'native'} | "
                         f"{r['error']} | | |")
            continue
        lines.append(f"| {r['job']} | {r['axis']} | {r['shape']} | {r['n']} | {r['tokens'] / r['n']:.0f} | "
                     f"{r['seconds']:.2f} | {r['peak_mb']:.0f} | {r['working_mb']:.0f} |")
    html = out.with_suffix(".html")
    try:
        figure(rows).write_html(html, include_plotlyjs="cdn")
        lines += ["", f"Plots (log-log, one panel per axis): [{html.name}]({html.name})."]
    except Exception as exc:  # plots are a convenience; the table is the record
        lines += ["", f"(plots not written: {exc})"]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out.with_suffix(".json")).write_text(json.dumps({"rows": rows, "fits": fits}, indent=1), encoding="utf-8")
    print(f"wrote {out}")


def figure(rows):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=3, subplot_titles=("non-embedding parameters", "prompts",
                                                        "tokens per prompt"))
    for job in dict.fromkeys(r["job"] for r in rows):
        for col, axis in enumerate(("size", "prompts", "seq_len"), 1):
            pts = [r for r in rows if r["job"] == job and r["axis"] == axis and "seconds" in r]
            xs = [nonembedding_params(r["shape"]) if axis == "size" else
                  (r["n"] if axis == "prompts" else r["tokens"] / r["n"]) for r in pts]
            fig.add_trace(go.Scatter(x=xs, y=[r["seconds"] for r in pts], mode="lines+markers", name=job,
                                     legendgroup=job, showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log", title_text="seconds", col=1)
    fig.update_layout(title="biaslens: time against model size, prompts and sequence length", height=450)
    return fig


if __name__ == "__main__":
    sys.exit(main())
