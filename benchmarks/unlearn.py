"""PCGU step cost against a plain SGD step on the same batch, on a GPT-2-small-shaped model.

    python benchmarks/unlearn.py [--pairs 16] [--seq 16] [--k 10000] [--reps 3] [--threads 1]

Model: a randomly initialised ``GPT2LMHeadModel`` with GPT-2 small's shape (12 layers, d_model 768,
12 heads, vocabulary 50,257; 124M parameters). Batch: ``--pairs`` contrast pairs of ``--seq``
random token ids per side (the cost does not depend on which tokens they are).

* plain step: one forward and backward of ``mean s(adv) − mean s(dis)`` over all ``2 × pairs``
  sequences at once, then ``torch.optim.SGD`` over every parameter;
* PCGU step: :func:`biaslens.unlearn.partitioned.pcgu_step` — ``g_a`` and ``g_d`` (one forward and
  backward per side), per-unit statistics over all 1-D and 2-D parameters (row partition),
  top-``k`` selection, masked update.

Time: median over ``--reps`` steps after one warm-up step, the two kinds interleaved in one
process. Memory: each kind runs in a fresh process; a thread samples the resident set size
(``/proc/self/statm``) every millisecond during the first step, and the peak above the RSS just
before the step is reported — resource-based, not ``tracemalloc`` (which cannot see torch's
allocations). Prints the table and writes ``docs/results/unlearn_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "unlearn_speed.md"
TARGET = 2.5


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the value at entry, sampled by a thread every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def build(args):
    """The GPT-2-small-shaped model, its parameters, unit layout and a batch of pairs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from biaslens.arch import arch_for
    from biaslens.unlearn.partitioned import PCGUConfig, ScoredBatch, unit_layout

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = GPT2LMHeadModel(cfg).eval()
    named = {n: p for n, p in model.named_parameters() if p.dim() in (1, 2)}
    layout = unit_layout(arch_for("gpt2"), {n: tuple(p.shape) for n, p in named.items()}, "rows")

    def side():
        ids = torch.randint(0, cfg.vocab_size, (args.pairs, args.seq))
        score = torch.ones_like(ids, dtype=torch.bool)
        score[:, 0] = False
        return ScoredBatch(ids, torch.ones_like(ids), score, mean=True)

    pcfg = PCGUConfig(k=args.k, lr=1e-5, batch_size=args.pairs)
    return model, list(named.values()), layout, side(), side(), pcfg


def plain_step(model, params, adv, dis, opt):
    """One SGD step on the same pairs: both sides in one forward/backward."""
    import torch

    from biaslens.unlearn.partitioned import ScoredBatch, side_scores

    both = ScoredBatch(torch.cat([adv.input_ids, dis.input_ids]),
                       torch.cat([adv.attention_mask, dis.attention_mask]),
                       torch.cat([adv.score, dis.score]), mean=True)
    s = side_scores(model, both)
    n = len(adv)
    loss = s[:n].mean() - s[n:].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _stepper(kind: str, args, built):
    import torch

    from biaslens.unlearn.partitioned import pcgu_step

    model, params, layout, adv, dis, cfg = built
    opt = torch.optim.SGD(params, lr=cfg.lr)
    weights = torch.full((len(adv),), 1.0 / len(adv))
    if kind == "pcgu":
        return lambda: pcgu_step(model, params, layout, adv, dis, weights, cfg)
    return lambda: plain_step(model, params, adv, dis, opt)


def memory(kind: str, args) -> dict:
    """In a fresh process: peak RSS above the start of the first ``kind`` step."""
    import torch

    torch.set_num_threads(args.threads)
    built = build(args)
    step = _stepper(kind, args, built)
    with PeakRSS() as mem:
        step()
    params, layout = built[1], built[2]
    return {"peak_extra_bytes": mem.extra, "model_bytes": sum(p.numel() * p.element_size() for p in params),
            "n_units": layout.total}


def timing(args) -> dict:
    """Median seconds of each kind of step, interleaved after one warm-up of each."""
    import torch

    torch.set_num_threads(args.threads)
    built = build(args)
    steps = {k: _stepper(k, args, built) for k in ("plain", "pcgu")}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.reps + 1):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if rep:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {"times": times}


def selection_overhead(args) -> float:
    """Seconds of the PCGU-only work (statistics, top-k, masked update) on given gradients."""
    import torch

    from biaslens.unlearn.partitioned import select_units, step_units, unit_cosines, unit_stats

    torch.set_num_threads(args.threads)
    model, params, layout, adv, dis, cfg = build(args)
    ga = [torch.randn_like(p) for p in params]
    gd = [torch.randn_like(p) for p in params]
    times = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        stats = torch.cat([unit_stats(a, d, dim, n) for a, d, dim, n
                           in zip(ga, gd, layout.dims, layout.sizes)], 1)
        sel = select_units(unit_cosines(stats), cfg.k)
        step_units([p.data for p in params], ga, gd, layout, sel, cfg.lr, cfg.variant)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", kind, "--pairs", str(args.pairs), "--seq", str(args.seq),
           "--k", str(args.k), "--reps", str(args.reps), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(plain: dict, pcgu: dict, overhead: float, args) -> str:
    mb = 1 / 2**20
    t_ratio = pcgu["median_s"] / plain["median_s"]
    m_ratio = pcgu["peak_extra_bytes"] / max(plain["peak_extra_bytes"], 1)
    ok = "meets" if t_ratio <= TARGET else "misses"
    lines = [
        "# PCGU step vs plain SGD step (GPT-2-small shape)",
        "",
        f"Model: random `GPT2LMHeadModel`, 12 layers, d_model 768, vocab 50,257 "
        f"({plain['model_bytes'] * mb:,.0f} MB of fp32 parameters, {pcgu['n_units']:,} PCGU row units). "
        f"Batch: {args.pairs} pairs × {args.seq} tokens per side. k = {args.k:,}. CPU, "
        f"{args.threads} thread(s); median of {args.reps} steps after a warm-up.",
        "",
        "| step | median time (s) | time ratio | peak RSS above start of step (MB) | memory ratio |",
        "|---|---:|---:|---:|---:|",
        f"| plain SGD (both sides, one forward/backward) | {plain['median_s']:.2f} | 1.00 | "
        f"{plain['peak_extra_bytes'] * mb:,.0f} | 1.00 |",
        f"| PCGU (g_a, g_d, per-unit cosine, top-k, masked update) | {pcgu['median_s']:.2f} | "
        f"**{t_ratio:.2f}** | {pcgu['peak_extra_bytes'] * mb:,.0f} | **{m_ratio:.2f}** |",
        f"| of which statistics + top-k + update | {overhead:.2f} | {overhead / plain['median_s']:.2f} | | |",
        "",
        f"Target ≤ {TARGET}× a plain step: **{ok}** ({t_ratio:.2f}×).",
        "",
        "Memory is resource-based: the resident set size sampled every 1 ms by a thread during the "
        "first step of a fresh process, minus the RSS just before it (tracemalloc cannot see "
        "torch's allocations). PCGU keeps g_a while computing g_d (one extra gradient copy) but "
        "runs each side's forward on half the sequences of the plain step.",
        "",
        f"Command: `python benchmarks/unlearn.py --pairs {args.pairs} --seq {args.seq} --k {args.k} "
        f"--reps {args.reps} --threads {args.threads}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=16, help="pairs per batch (PCGU's batch size)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = stable on a shared machine)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        jobs = {"overhead": selection_overhead, "time": timing}
        res = jobs[args._child](args) if args._child in jobs else memory(args._child, args)
        print(json.dumps(res))
        return 0
    plain, pcgu = _child("plain", args), _child("pcgu", args)
    times = _child("time", args)
    plain["median_s"], pcgu["median_s"] = times["plain"], times["pcgu"]
    overhead = _child("overhead", args)
    md = table(plain, pcgu, overhead, args)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
