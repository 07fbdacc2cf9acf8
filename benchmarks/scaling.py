"""How the cost of each biaslens job grows: with model size, number of prompts and sequence length.

Jobs: noise tracing, attribution patching, the LSDM edit (key statistics not cached, then cached),
occupational-bias evaluation and one PCGU step. Models: GPT-2 small, medium and large shapes
(12 × 768, 24 × 1024, 36 × 1280) with random weights and the real GPT-2 BPE.

Axes (the other two held at their base value: GPT-2 small, 10 prompts, native prompt length,
about 10 tokens):

- model size: small, medium, large;
- prompts: 10, 100, 1000;
- sequence length: each prompt prefixed with general text to 16, 64 and 256 tokens.

What each job runs (fixed units, the same at every point of the grid):

- ``noise``: the noise trace of the MLP outputs at every layer and two token roles
  (``subject_last``, ``last``) with 2 noise samples (:data:`NOISE_UNIT`) — a reduced unit: the
  default trace restores 3 components × 6 roles × 10 samples, 90 times as many sites, which on
  a 2-core CPU is unaffordable across the grid. With ``--skip-heavy`` the trace is not run at
  1000 prompts: its time is projected from the 10 → 100 prompt exponent and labelled
  *projected*; so is the PCGU step on a batch of 1000 pairs.
- ``attribution``: the attribution map of the MLP outputs at every layer × 6 roles with 2 noise
  samples (:data:`ATTRIBUTION_UNIT`; the default is 10 samples, 5 times the corrupted rows): one
  clean forward, one corrupted forward and one backward.
- ``lsdm_uncached``: an LSDM edit of the middle layer, role ``last``, Gauss-Newton targets only
  (``v_steps=0``), no keep prompts, key statistics over 8,192 tokens of general text in windows
  of 128 (more than GPT-2 large's 5,120 MLP keys: fewer leave the statistic singular) computed
  and cached; ``lsdm_cached``: the same edit again, reading those statistics.
- ``evaluate``: :func:`biaslens.evaluate.occupational_bias` on the prompts.
- ``pcgu_step``: one PCGU step (k = 1000 row units, lr 1e-5, the transformer blocks' weights,
  no validation, no keep term) on one batch holding every prompt's pronoun pair; each side's
  forward and backward runs in parts of at most ``GRAD_TOKENS`` (1,024) tokens, as PCGU does.

Measurement: one child process per grid point (model shape, prompts, length); it loads the model,
runs one warm-up forward (so the weights, memory-mapped from safetensors, are resident), then runs
the jobs one after another. Per job: wall time, and its *working memory* — the peak resident set
(``/proc/self/statm`` sampled every 2 ms by a thread) above the level just before the job. The
child runs with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so buffers of 128 KiB
and more go back to the system when freed and one job's freed memory does not hide the next
job's. On CUDA the working memory is ``torch.cuda.max_memory_allocated`` above the level before
the job. The child's own ``ru_maxrss`` (peak of the whole process) is reported with every row.

For every job and axis, a least-squares fit of log(time) on log(x) gives the exponent (x =
non-embedding parameters, prompts, tokens per prompt); from the largest measured shape the
size exponent projects a LLaMA-2-7B-shaped model (by non-embedding parameters), printed next to
the measured rows and labelled *projected*. See docs/gpu.md for what the numbers mean on a GPU.

    python benchmarks/scaling.py [--out docs/results/scaling.md] [--threads 1] [--device cpu]
    python benchmarks/scaling.py --quick     # a reduced grid, to check the script end to end
    python benchmarks/scaling.py --jobs noise --points small/10/native     # one job at one point
    python benchmarks/scaling.py --rewrite WORK/rows.json[,WORK2/rows.json]  # the pages from runs' rows

Writes ``--out`` (markdown), the same path with ``.json`` (every row and fit) and ``.svg``
(log-log plots, drawn by this script).
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
import threading
import time
from pathlib import Path

__all__ = ["fit", "project", "points", "time_key", "summarise", "merge_runs", "write", "svg_plots", "nonembedding_params"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}
#: cheap jobs first, so that a child killed late (time, memory) has reported the others
JOBS = ("evaluate", "attribution", "noise", "lsdm_uncached", "lsdm_cached", "pcgu_step")
AXES = ("size", "prompts", "seq_len")
AXIS_LABEL = {"size": "non-embedding parameters", "prompts": "prompts", "seq_len": "tokens per prompt"}
#: a LLaMA-2-7B-shaped model's non-embedding parameters (32 layers, d 4096, gated MLP 11008)
SEVEN_B_NONEMB = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
NOISE_UNIT = {"components": ("mlp",), "roles": ("subject_last", "last"), "n_samples": 2}
ATTRIBUTION_UNIT = {"components": ("mlp",), "n_samples": 2}
#: the default noise trace (biaslens.locate.noise.trace_noise): 3 components × 6 roles × 10 samples
NOISE_DEFAULT_SITES_FACTOR = (3 * 6 * 10) / (1 * 2 * 2)
#: above GPT-2 large's d_mlp (5,120): fewer tokens than key dimensions leave the key statistic singular
COV_TOKENS = 8192
PCGU_K = 1000
MMAP_THRESHOLD = 131072
#: seconds a child may spend on one job (the clock restarts as each job reports); then it is killed
JOB_TIMEOUT = 1200


def nonembedding_params(shape: str) -> int:
    """Weights of the blocks (attention 4 d², MLP 8 d²), the count scaling laws use."""
    n_layer, d, _ = SHAPES[shape]
    return n_layer * 12 * d * d


def rss_mb() -> float:
    """Current resident set size (MB), from /proc when it exists, else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_mb()


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


class PeakSampler:
    """Peak of :func:`rss_mb` while the ``with`` block runs, sampled every 2 ms by a thread."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())
        return False


# ------------------------------------------------------------------------------ one child
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
    """Run ``job`` once; returns facts about it (the caller times it, unless ``timed_inside``)."""
    import inspect

    if job == "noise":
        from biaslens.locate import locate

        emap = locate(model, prompts, method="noise", max_prompts=None, progress=False, **NOISE_UNIT)
        return {"sites": int(len(emap.layers) * len(emap.roles)) * len(prompts) * NOISE_UNIT["n_samples"]}
    if job == "attribution":
        from biaslens.locate import locate

        emap = locate(model, prompts, method="attribution", max_prompts=None, **ATTRIBUTION_UNIT)
        return {"sites": int(len(emap.layers) * len(emap.roles)) * len(prompts) * ATTRIBUTION_UNIT["n_samples"]}
    if job == "evaluate":
        from biaslens.evaluate import occupational_bias

        occupational_bias(model, prompts)
        return {}
    if job.startswith("lsdm"):
        from biaslens.edit.least_squares import lsdm

        kw = dict(layers=[model.n_layers // 2], role="last", keep_prompts=[], progress=False,
                  hparams={"cov_tokens": COV_TOKENS, "cov_seq_len": 128, "v_steps": 0},
                  cache_dir=work / f"cov-{os.getpid()}")  # this child's own: cold for lsdm_uncached
        if "tune" in inspect.signature(lsdm).parameters:
            kw["tune"] = "off"
        lsdm(model, prompts, **kw).undo(model)  # lsdm_cached runs after lsdm_uncached filled the cache
        return {"cov_tokens": COV_TOKENS}
    if job == "pcgu_step":
        from biaslens.unlearn.pairs import pronoun_pairs
        from biaslens.unlearn.partitioned import pcgu

        pairs = pronoun_pairs(prompts, source="scaling benchmark")
        delta = pcgu(model, pairs, k=PCGU_K, lr=1e-5, batch_size=len(pairs), max_steps=1, progress=False,
                     validation=None, keep_weight=0.0)
        delta.undo(model)
        return {"batch": len(pairs)}
    raise ValueError(job)


def child(args) -> int:
    import gc

    import torch

    torch.set_num_threads(args.threads)
    import biaslens

    cuda = args.device.startswith("cuda")
    work = Path(args.work)
    folder = build_model(args.shape, work / f"gpt2-{args.shape}")
    rss0 = rss_mb()
    model = biaslens.load(str(folder), device=args.device)
    prompts = prompts_for(model, args.n, args.seq_len)
    n_tokens = sum(len(r) for r in model.tokenize([p.text for p in prompts]))
    with torch.no_grad():  # warm-up: the memory-mapped weights become resident
        model.last_logits(model.encode(prompts[:4]))
    rss_loaded = rss_mb()
    for job in args.jobs.split(","):
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            gpu0 = torch.cuda.memory_allocated()
        with PeakSampler() as mem:
            t0, c0 = time.perf_counter(), cpu_seconds()
            try:
                extra = run_job(job, model, prompts, work)
            except Exception as exc:  # reported as not measured; the child goes on with the next job
                print(json.dumps({"job": job, "shape": args.shape, "n": args.n, "seq_len": args.seq_len,
                                  "error": f"{type(exc).__name__}: {exc}"[:200]}), flush=True)
                continue
            if cuda:
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        row = {"job": job, "shape": args.shape, "n": args.n, "seq_len": args.seq_len, "tokens": n_tokens,
               "seconds": seconds, "cpu_seconds": cpu, "working_mb": max(0.0, mem.peak - mem.start),
               "process_peak_mb": peak_mb(), "model_mb": rss_loaded - rss0, "device": args.device, **extra}
        if cuda:
            row["gpu_working_mb"] = max(0.0, (torch.cuda.max_memory_allocated() - gpu0) / 2**20)
        print(json.dumps(row), flush=True)
    return 0


# ------------------------------------------------------------------------------ the grid
def grid(quick: bool) -> list[dict]:
    """The grid points: (shape, prompts, length) with the axes each belongs to and its jobs."""
    shapes = ["small", "medium"] if quick else list(SHAPES)
    counts = [10, 100] if quick else [10, 100, 1000]
    lengths = [16, 64] if quick else [16, 64, 256]
    pts = [{"shape": s, "n": 10, "seq_len": None, "axes": ["size"] + (["prompts"] if s == "small" else [])}
           for s in shapes]
    pts += [{"shape": "small", "n": 10, "seq_len": L, "axes": ["seq_len"]} for L in lengths]
    pts += [{"shape": "small", "n": n, "seq_len": None, "axes": ["prompts"]} for n in counts if n != 10]
    return pts  # the most prompts last: the longest child


def skipped(job: str, point: dict, skip_heavy: bool = False) -> bool:
    """Measurements not run (projected instead, see the module docstring): with ``--skip-heavy``,
    the noise trace and the PCGU step at more than 100 prompts."""
    return skip_heavy and job in ("noise", "pcgu_step") and point["n"] > 100


def measure(point: dict, jobs: list[str], args) -> list[dict]:
    jobs = [j for j in jobs if not skipped(j, point, args.skip_heavy)]
    if not jobs:
        return []
    if "lsdm_cached" in jobs and "lsdm_uncached" not in jobs:
        jobs.insert(jobs.index("lsdm_cached"), "lsdm_uncached")  # it fills the cache
    cmd = [sys.executable, __file__, "--child", "--jobs", ",".join(jobs), "--shape", point["shape"],
           "--n", str(point["n"]), "--threads", str(args.threads), "--work", str(args.work),
           "--device", args.device]
    if point["seq_len"]:
        cmd += ["--seq-len", str(point["seq_len"])]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = {"timer": None, "timed_out": False}

    def arm() -> None:  # one job's time limit, from its start (the previous job's report)
        if state["timer"] is not None:
            state["timer"].cancel()

        def expire() -> None:
            state["timed_out"] = True
            proc.kill()

        state["timer"] = threading.Timer(JOB_TIMEOUT, expire)
        state["timer"].start()

    arm()
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    rows = []
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        rows.append(r)
        arm()
        if "error" in r:
            print(f"  {r['job']:<14} {r['shape']:<7} n={r['n']} len={r['seq_len'] or 'native'}: {r['error']}", flush=True)
            continue
        print(f"  {r['job']:<14} {r['shape']:<7} n={r['n']:<5} len={r['seq_len'] or 'native':<6} "
              f"{r['seconds']:8.2f} s  working {r['working_mb']:6.0f} MB  process peak "
              f"{r['process_peak_mb']:6.0f} MB  (child {time.perf_counter() - t0:.0f} s)", flush=True)
    proc.wait()
    state["timer"].cancel()
    drain.join(5)
    done = {r["job"] for r in rows}
    why = (f"timed out (over {JOB_TIMEOUT} s for one job)" if proc.returncode == -9 and state["timed_out"]
           else "killed by SIGKILL (signal 9: on Linux the out-of-memory killer, unless someone sent it)"
           if proc.returncode == -9 and not err
           else f"child exited {proc.returncode}: " + ((err or ["?"])[-1].strip()[:160]))
    for j in jobs:
        if j not in done:
            rows.append({"job": j, "shape": point["shape"], "n": point["n"], "seq_len": point["seq_len"],
                         "error": why})
            print(f"  {j:<14} {point['shape']:<7} n={point['n']} len={point['seq_len'] or 'native'}: {why}",
                  flush=True)
    return [dict(r, axes=point["axes"]) for r in rows]


# ------------------------------------------------------------------------------ pure parts
def fit(xs, ys) -> float | None:
    """Least-squares slope of log(y) on log(x) over the points with x, y > 0 (None: < 2 of them)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if x and y and x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def project(x0: float, y0: float, exponent: float, x: float) -> float:
    """y at ``x`` on the power law through (x0, y0) with ``exponent``."""
    if not (x0 > 0 and y0 > 0 and x > 0 and math.isfinite(exponent)):
        raise ValueError("projection needs positive points and a finite exponent")
    return y0 * (x / x0) ** exponent


def x_of(row: dict, axis: str) -> float:
    if axis == "size":
        return float(nonembedding_params(row["shape"]))
    if axis == "prompts":
        return float(row["n"])
    return row["tokens"] / row["n"]


def points(rows: list[dict], job: str, axis: str, key: str = "seconds") -> list[tuple[float, float]]:
    """(x, value) of the measured rows of ``job`` on ``axis``, sorted by x."""
    pts = [(x_of(r, axis), r[key]) for r in rows if r["job"] == job and axis in r["axes"] and key in r]
    return sorted(pts)


def _kind(e: float | None) -> str:
    if e is None:
        return "not fitted"
    if e < 0.3:
        return "nearly flat"
    if e < 0.8:
        return "sub-linear"
    if e <= 1.25:
        return "about linear"
    return "super-linear"


WHAT = {
    "noise": "one corrupted forward per prompt and sample, then one partial forward per restored (layer, role) "
             "site from the restored position on; restoring at layer l reruns the layers above l, so the block "
             "calls of the sweep grow with the square of the depth",
    "attribution": "three passes whatever the number of sites: the clean forward, the corrupted forward and one "
                   "backward",
    "lsdm_uncached": "the key statistics (a forward over 8,192 general-text tokens up to the edited layer and a "
                     "d_mlp² accumulation), then the targets and the solve",
    "lsdm_cached": "the Gauss-Newton targets (forward and backward over the prompts) and the d_mlp × d_mlp solve; "
                   "the general text is not read",
    "evaluate": "one forward per batch of prompts, two pronoun columns read at the last token",
    "pcgu_step": "a forward and backward over both sides of every pair (in parts of at most 1,024 tokens), then per-unit gradient cosines over all "
                 "block weights, top-k and the update",
}


def time_key(rows: list[dict]) -> str:
    """The time the fits use: CPU seconds of the child (user + system) when every measured row has
    them and ran on a CPU — on a shared machine they move far less with other jobs' load than wall
    time does — else wall seconds (a GPU's work is not the CPU's)."""
    done = [r for r in rows if "seconds" in r]
    cpu = done and all("cpu_seconds" in r and str(r.get("device", "cpu")) == "cpu" for r in done)
    return "cpu_seconds" if cpu else "seconds"


def summarise(rows: list[dict], key: str | None = None) -> dict:
    """Per job: exponents on each axis (time ``key``, default :func:`time_key`; and working memory vs
    size), the largest measured shape and the projections (7B; 1000 prompts where not measured)."""
    key = key or time_key(rows)
    out = {}
    for job in dict.fromkeys(r["job"] for r in rows):
        s = {"exp": {a: fit(*zip(*points(rows, job, a, key))) if points(rows, job, a, key) else None
                     for a in AXES}, "key": key}
        mem = points(rows, job, "size", "working_mb")
        s["exp_mem_size"] = fit(*zip(*mem)) if mem else None
        size = [r for r in rows if r["job"] == job and "size" in r["axes"] and key in r]
        big = max(size, key=lambda r: nonembedding_params(r["shape"]), default=None)
        s["largest"] = big
        if big and s["exp"]["size"] is not None:
            x0 = nonembedding_params(big["shape"])
            s["proj_7b_seconds"] = project(x0, big[key], s["exp"]["size"], SEVEN_B_NONEMB)
            if s["exp_mem_size"] is not None and big["working_mb"] > 0:
                s["proj_7b_working_mb"] = project(x0, big["working_mb"], s["exp_mem_size"], SEVEN_B_NONEMB)
        pr = points(rows, job, "prompts", key)
        if not any(x == 1000 for x, _ in pr) and s["exp"]["prompts"] is not None and pr:
            x0, y0 = pr[-1]
            s["proj_1000_seconds"] = project(x0, y0, s["exp"]["prompts"], 1000)
        out[job] = s
    return out


def dominates(job: str, s: dict, rows: list[dict]) -> str:
    """One sentence from the numbers: how the time grows on each axis and what that says."""
    e = s["exp"]
    parts = [f"{_kind(e['size'])} in parameters, {_kind(e['prompts'])} in prompts, "
             f"{_kind(e['seq_len'])} in tokens per prompt"]
    if e["size"] is not None and e["size"] < 0.8:
        parts.append(", so costs that grow more slowly than the blocks' weights weigh as much as the block "
                     "matmuls: per-call and Python overhead, and work that grows with the width only (the "
                     "50,257-row unembedding; one layer's d_mlp × d_mlp statistic and solve)")
    elif e["size"] is not None:
        parts.append(", so the block matmuls dominate")
    if e["prompts"] is not None and e["prompts"] < 0.5:
        parts.append(", and a part independent of the prompts dominates at these counts")
    if job == "lsdm_uncached":
        k = s["key"]
        unc = {r["shape"]: r[k] for r in rows if r["job"] == job and "size" in r["axes"] and k in r}
        cac = {r["shape"]: r[k] for r in rows if r["job"] == "lsdm_cached" and "size" in r["axes"] and k in r}
        shares = [f"{sh} {100 * (unc[sh] - cac[sh]) / unc[sh]:.0f}%" for sh in unc if sh in cac and unc[sh] > 0]
        if shares:
            parts.append("; the key statistics (uncached minus cached) take " + ", ".join(shares) + " of it")
    if job == "pcgu_step":
        ratios = [f"{sh} {r['working_mb'] / (nonembedding_params(sh) * 4 / 2**20):.1f}×" for r in rows
                 for sh in [r["shape"]] if r["job"] == job and "size" in r["axes"] and "seconds" in r]
        if ratios:
            parts.append("; its working memory is " + ", ".join(ratios) + " the blocks' fp32 weights (the "
                         "snapshot of the trained weights, g_a and g_d)")
    return "".join(parts) + ". Work: " + WHAT.get(job, "") + "."


def merge_runs(recs: list[dict]) -> tuple[list[dict], str]:
    """Rows of several runs: every job's rows from the last run that measured it; and a sentence
    naming each run's command, wall time and jobs, and what the replaced rows had been."""
    ident = lambda r: (r["job"], r["shape"], r["n"], r["seq_len"])
    rows: list[dict] = []
    replaced: dict[str, list[dict]] = {}
    for i, rec in enumerate(recs):
        rec = dict(rec, rows=[r for r in rec["rows"] if r["job"] in JOBS])  # a child started with no job
        new = {ident(r) for r in rec["rows"]}
        for r in rows:
            if ident(r) in new:
                replaced.setdefault(r["job"], []).append(r)
        rows = [r for r in rows if ident(r) not in new] + [dict(r, run=i) for r in rec["rows"]]
    parts = []
    for i, rec in enumerate(recs):
        mine = [r for r in rows if r.get("run") == i]
        jobs = list(dict.fromkeys(r["job"] for r in mine))
        if not jobs:
            continue
        full = [r for r in rec["rows"] if r["job"] == jobs[0]]
        where = "" if i == 0 or len(full) > 1 else (
            f" at {full[0]['shape']}, {full[0]['n']} prompts, {full[0]['seq_len'] or 'native'} length")
        parts.append(f"`{rec['command']}` ({rec['wall_s'] / 60:.0f} min wall) for {', '.join(jobs)}{where}")
    note = "; ".join(parts)
    failed: dict[str, list[str]] = {}  # error -> "job (n points)"
    for j, old in replaced.items():
        bad = [r for r in old if "error" in r]
        if bad:
            failed.setdefault(_clean(bad[0]["error"]), []).append(f"{j} ({len(bad)} point{'s' * (len(bad) > 1)})")
    for err, what in failed.items():
        note += f". Replaced because they failed in the first run: {', '.join(what)} — {err}"
    return rows, note


def _clean(text: str) -> str:
    """An error message without the file paths of the machine it ran on."""
    import re

    return re.sub(r"\s*\((?:/|[A-Za-z]:\\)[^)]*\)", "", str(text)).replace(str(ROOT) + os.sep, "")


def _f(e):
    return "—" if e is None else f"{e:.2f}"


def _mb(x):
    return f"{x:,.0f}"


def write(rows: list[dict], out: Path, command: str, wall: float, threads: int, device: str,
          several: bool = False) -> None:
    """Write ``out`` (markdown), ``out.json`` and ``out.svg`` from measured ``rows``; ``several``:
    ``command`` is :func:`merge_runs`'s sentence about the runs the rows come from."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(r, error=_clean(r["error"])) if "error" in r else r for r in rows]
    command = _clean(command)
    key = time_key(rows)
    unit = "CPU s" if key == "cpu_seconds" else "s"
    summ = summarise(rows, key)
    measured_jobs = [r for r in rows if "seconds" in r]
    errors = [r for r in rows if "error" in r]
    where = (f"a {os.cpu_count()}-core CPU machine shared with other jobs, torch threads {threads}"
             if device == "cpu" else f"device {device}, torch threads {threads}")
    lines = [
        "# How the cost grows (`benchmarks/scaling.py`)",
        "",
        (f"Measured in several runs (a later run's rows replace an earlier run's rows of the same job and grid "
          f"point): {command}. On {where}. GPT-2 shapes " if several
         else f"Measured in one run of `{command}` ({wall / 60:.0f} min wall) on {where}. GPT-2 shapes ") +
        "(small 12 × 768, medium 24 × 1024, large 36 × 1280) with random weights and the real GPT-2 BPE; "
        "one child process per grid point, the jobs run one after another in it after a warm-up forward. "
        "**working** = the job's peak resident memory (sampled every 2 ms) above the level before it; "
        "**process peak** = the child's `ru_maxrss` so far (model, libraries and earlier jobs included). "
        + ("Times are given as the child's CPU seconds (user + system, all threads) and wall seconds; on this "
           "shared machine wall time moved with the other jobs' load, so the exponents and projections use CPU "
           "seconds, fitted by log-log least squares over the measured points." if key == "cpu_seconds" else
           "The exponents and projections use wall seconds, fitted by log-log least squares over the measured "
           "points."),
        "",
        "What each job runs (the same fixed unit at every point):",
        "",
        "- **noise** — *reduced unit*: the noise trace of the MLP outputs at every layer × 2 roles "
        "(`subject_last`, `last`) × 2 noise samples per prompt. The default trace (3 components × 6 roles × "
        f"10 samples) restores {NOISE_DEFAULT_SITES_FACTOR:.0f}× as many sites."
        + ("" if not any("proj_1000_seconds" in s for s in summ.values()) else
           " Jobs not measured at 1000 prompts have that row *projected* from the 10 → 100 exponent."),
        "- **attribution** — the attribution map of the MLP outputs at every layer × 6 roles with 2 noise samples "
        "(the default 10 samples has 5× the corrupted rows).",
        f"- **lsdm_uncached** — LSDM at the middle layer, role `last`, `v_steps=0`, no keep prompts, key "
        f"statistics over {COV_TOKENS:,} general-text tokens (windows of 128) computed; **lsdm_cached** — the "
        "same edit with those statistics read from the cache.",
        "- **evaluate** — `occupational_bias` on the prompts.",
        f"- **pcgu_step** — one PCGU step, k = {PCGU_K:,} row units, lr 1e-5, block weights, no validation, "
        "no keep term, one batch of every prompt's pronoun pair (each side's forward and backward in parts of at "
        "most 1,024 tokens).",
        "",
        "## Summary",
        "",
        "| job | exponent vs parameters | exponent vs prompts | exponent vs tokens per prompt | "
        "exponent of working memory vs parameters | measured, GPT-2 large | **projected, LLaMA-2-7B shape** | "
        "what dominates |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for job, s in summ.items():
        e = s["exp"]
        big = s["largest"]
        meas = "—" if not big else (f"{big[key]:.1f} {unit}, working {_mb(big['working_mb'])} MB "
                                    f"({big['shape']})")
        proj = "—"
        if "proj_7b_seconds" in s:
            proj = f"*projected*: {s['proj_7b_seconds']:,.0f} {unit}"
            if "proj_7b_working_mb" in s:
                proj += f", working {_mb(s['proj_7b_working_mb'])} MB"
        lines.append(f"| {job} | {_f(e['size'])} | {_f(e['prompts'])} | {_f(e['seq_len'])} | "
                     f"{_f(s['exp_mem_size'])} | {meas} | {proj} | {dominates(job, s, rows)} |")
    lines += [
        "",
        "Projections (not measurements): the 7B column scales the largest measured shape's time (and "
        "working memory) by (LLaMA-2-7B non-embedding parameters, "
        f"{SEVEN_B_NONEMB / 1e9:.2f} B / the shape's own)^exponent, on this machine and thread count. Three "
        "shapes span a 6.6× range of parameters and 7B is 9× beyond the largest, so these are order-of-"
        "magnitude figures; the fit cannot see a change of regime (memory bandwidth, a GPU's parallelism) "
        "outside the measured range. The 7B model's own fp32 weights (about 27 GB) come on top of the "
        "working memory.",
        "",
    ]
    proj_rows = [(job, s) for job, s in summ.items() if "proj_1000_seconds" in s]
    if proj_rows:
        lines += [f"| job | prompts | {unit} | how |", "|---|---:|---|---|"]
        for job, s in proj_rows:
            x0, y0 = points(rows, job, "prompts", key)[-1]
            lines.append(f"| {job} | 1000 | *projected*: {s['proj_1000_seconds']:,.0f} {unit} | from {x0:.0f} "
                         f"prompts ({y0:.1f} {unit}) with the measured exponent {s['exp']['prompts']:.2f}; "
                         "not measured |")
        noise = summ.get("noise")
        if noise and "proj_1000_seconds" in noise:
            lines.append(f"| noise, default trace (3 components × 6 roles × 10 samples) | 1000 | *projected*: "
                         f"{noise['proj_1000_seconds'] * NOISE_DEFAULT_SITES_FACTOR:,.0f} {unit} | the row above × "
                         f"{NOISE_DEFAULT_SITES_FACTOR:.0f} (its sites over the reduced unit's), assuming time "
                         "linear in sites; not run |")
        lines.append("")
    lines += ["## Measured rows", "",
              "| job | axes | shape | prompts | tokens/prompt | wall s | CPU s | working MB | process peak MB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    order = {j: i for i, j in enumerate(JOBS)}
    for r in sorted(rows, key=lambda r: (order.get(r["job"], len(order)), AXES.index(r["axes"][0]),
                                         nonembedding_params(r["shape"]), r["n"], r["seq_len"] or 0)):
        ax = ", ".join(r["axes"])
        tpp = f"{r['tokens'] / r['n']:.1f}" if "tokens" in r else (str(r["seq_len"]) if r["seq_len"] else "native")
        if "error" in r:
            lines.append(f"| {r['job']} | {ax} | {r['shape']} | {r['n']} | {tpp} | not measured: {r['error']} "
                         "| | | |")
            continue
        cpu = f"{r['cpu_seconds']:.2f}" if "cpu_seconds" in r else "—"
        lines.append(f"| {r['job']} | {ax} | {r['shape']} | {r['n']} | {tpp} | {r['seconds']:.2f} | {cpu} | "
                     f"{_mb(r['working_mb'])} | {_mb(r['process_peak_mb'])} |")
    if any("gpu_working_mb" in r for r in measured_jobs):
        lines += ["", "GPU working memory (MB, `max_memory_allocated` above the level before the job): "
                  + "; ".join(f"{r['job']} {r['shape']} n={r['n']} len={r['seq_len'] or 'native'}: "
                              f"{r['gpu_working_mb']:,.0f}" for r in measured_jobs if "gpu_working_mb" in r) + "."]
    if errors:
        lines += ["", f"{len(errors)} measurement(s) did not finish (see the rows marked *not measured*)."]
    svg = out.with_suffix(".svg")
    svg.write_text(svg_plots(rows, key), encoding="utf-8")
    lines += ["", f"Plots (log-log {unit} against each axis, one line per job): [{svg.name}]({svg.name})", "",
              f"![time against parameters, prompts and tokens per prompt]({svg.name})"]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fits = {job: {"time": key, "exponents": s["exp"], "exponent_working_mb_vs_size": s["exp_mem_size"],
                  **{k: v for k, v in s.items() if k.startswith("proj_")}} for job, s in summ.items()}
    out.with_suffix(".json").write_text(json.dumps({"command": command, "several_runs": several, "wall_s": wall, "threads": threads,
                                                    "device": device, "rows": rows,
                                                    "fits": fits}, indent=1), encoding="utf-8")
    print(f"wrote {out}")


COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def svg_plots(rows: list[dict], key: str = "seconds") -> str:
    """Three log-log panels (time against parameters, prompts, tokens per prompt) as one SVG."""
    from xml.sax.saxutils import escape

    jobs = list(dict.fromkeys(r["job"] for r in rows))
    W, H, pad, top = 300, 260, 52, 30
    width = 3 * W + 170
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H + top + 40}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{H + top + 40}" fill="white"/>']
    ys = [r[key] for r in rows if key in r and r[key] > 0]
    if not ys:
        return out[0] + "</svg>\n"
    ylo, yhi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    yhi = max(yhi, ylo + 1)
    for col, axis in enumerate(AXES):
        x0 = col * W + pad
        pw, ph = W - pad - 12, H - 40
        xs = [x for j in jobs for x, _ in points(rows, j, axis, key)]
        if not xs:
            continue
        xlo, xhi = math.log10(min(xs)), math.log10(max(xs))
        if xhi - xlo < 1e-9:
            xlo, xhi = xlo - 0.5, xhi + 0.5
        xlo, xhi = xlo - 0.05 * (xhi - xlo), xhi + 0.05 * (xhi - xlo)
        px = lambda v: x0 + (math.log10(v) - xlo) / (xhi - xlo) * pw
        py = lambda v: top + ph - (math.log10(v) - ylo) / (yhi - ylo) * ph
        out.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{x0 + pw / 2}" y="{top + ph + 32}" text-anchor="middle">{escape(AXIS_LABEL[axis])} '
                   '(log)</text>')
        for k in range(ylo, yhi + 1):
            y = py(10.0 ** k)
            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{10.0 ** k:g}</text>')
        for v in sorted(set(xs)):
            x = px(v)
            lab = f"{v / 1e6:.0f}M" if axis == "size" else f"{v:.0f}"
            out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{lab}</text>')
        if col == 0:
            out.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
                       f'text-anchor="middle">{"CPU seconds" if key == "cpu_seconds" else "seconds"} (log)</text>')
        for i, job in enumerate(jobs):
            pts = points(rows, job, axis, key)
            if not pts:
                continue
            c = COLOURS[i % len(COLOURS)]
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts if y > 0)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{c}" stroke-width="1.5"/>')
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>' for x, y in pts if y > 0]
    for i, job in enumerate(jobs):
        y = top + 14 + 16 * i
        c = COLOURS[i % len(COLOURS)]
        out.append(f'<line x1="{3 * W + 10}" x2="{3 * W + 30}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{3 * W + 36}" y="{y + 4}">{escape(job)}</text>')
    out.append(f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">biaslens: measured time '
               'against model size, prompts and sequence length</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "scaling.md"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-heavy", action="store_true",
                    help="do not run the noise trace and the PCGU step at 1000 prompts (projected instead)")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--work", default=None, help="folder for the models and caches (default: a temporary one)")
    ap.add_argument("--rewrite", default=None, metavar="ROWS_JSON[,ROWS_JSON...]",
                    help="write the pages from the rows.json that runs left in their --work folders; a later "
                         "run's jobs replace an earlier run's rows of the same jobs; measures nothing")
    ap.add_argument("--points", default=None, metavar="SHAPE/PROMPTS/LENGTH[,...]",
                    help="measure only these grid points, e.g. small/1000/native,small/10/256")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.rewrite:  # the pages again from finished runs' rows (e.g. after changing the writer)
        recs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.rewrite.split(",")]
        rows, note = merge_runs(recs)
        write(rows, Path(args.out), recs[0]["command"] if len(recs) == 1 else note,
              sum(r["wall_s"] for r in recs), recs[0]["threads"], recs[0]["device"], several=len(recs) > 1)
        return 0
    from biaslens.errors import BiasLensError

    jobs = [j for j in args.jobs.split(",") if j]
    if args.points:
        args.points = args.points.split(",")
        known = {f"{p['shape']}/{p['n']}/{p['seq_len'] or 'native'}" for p in grid(args.quick)}
        if not set(args.points) <= known:
            raise BiasLensError(f"unknown grid points {sorted(set(args.points) - known)} (use any of: "
                                f"{', '.join(sorted(known))})")
    bad = [j for j in jobs if j not in JOBS]
    if bad or not jobs:
        raise BiasLensError(f"unknown jobs {bad} (use any of: {', '.join(JOBS)})")
    if args.threads < 1:
        raise BiasLensError(f"--threads must be at least 1 (got {args.threads})")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BiasLensError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="biaslens-scaling-")
        args.work = tmp.name
    command = "python benchmarks/scaling.py" + (" --quick" if args.quick else "") + \
        f" --threads {args.threads}" + (f" --device {args.device}" if args.device != "cpu" else "") + \
        (f" --jobs {args.jobs}" if jobs != list(JOBS) else "") + (f" --points {','.join(args.points)}" if args.points else "")
    started = time.time()
    rows = []
    for point in grid(args.quick):
        if args.points and f"{point['shape']}/{point['n']}/{point['seq_len'] or 'native'}" not in args.points:
            continue
        print(f"{point['shape']} n={point['n']} len={point['seq_len'] or 'native'}:", flush=True)
        rows += measure(point, jobs, args)
        record = {"command": command, "wall_s": time.time() - started, "threads": args.threads,
                  "device": args.device, "rows": rows}
        (Path(args.work) / "rows.json").write_text(json.dumps(record), encoding="utf-8")
    write(rows, Path(args.out), command, time.time() - started, args.threads, args.device)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
