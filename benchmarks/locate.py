"""Speed of biaslens exact patching and attribution patching vs TransformerLens ``patching``.

    python benchmarks/locate.py [--data-dir DIR] [--prompts 10] [--quick] [--out FILE]

Model: GPT-2-small shape (12 layers, d_model 768, 12 heads, vocab 50,257), random weights, the
real GPT-2 BPE. Prompts: ``--prompts`` occupation prompts, each corrupted by swapping the
occupation for a word of the same token length. Sites: residual stream (``resid_pre``), MLP output
and attention output at every layer × position (the padded width), patched from the clean run
into the corrupted run; metric: log P(" she") − log P(" he") at each prompt's last real token.

- TransformerLens: ``patching.get_act_patch_resid_pre / get_act_patch_mlp_out /
  get_act_patch_attn_out(bridge, corrupted_tokens, clean_cache, metric, reduce="none")`` on the
  same TransformerBridge (one forward per (layer, position)), plus its clean ``run_with_cache``.
- biaslens exact: :class:`biaslens.locate.patching.PatchEngine` (base run + clean cache included).
- biaslens attribution: one forward and one backward for all three components (clean cache
  included); its agreement (Pearson r) with the exact values is reported.

Both exact sides run per component in ABBA order (TL, ours, ours, TL, ...) so that load from other
jobs on a shared CPU falls on both alike. Per-prompt values must agree to 1e-4. Peak memory is the
peak resident set size above the level before each phase (sampled every 5 ms). Writes a markdown
table to docs/results/locate.md.
"""

from __future__ import annotations

import argparse
from functools import partial
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
from biaslens.data import ROOT as DEFAULT_DATA  # the shipped copies

# (clean occupation, corrupting word with the same number of GPT-2 tokens), checked at run time
PAIRS = [("nurse", "man"), ("secretary", "father"), ("dancer", "farmer"), ("doctor", "mother"),
         ("engineer", "teacher"), ("lawyer", "singer"), ("baker", "driver"), ("cashier", "janitor"),
         ("chef", "guard"), ("clerk", "pilot"), ("painter", "writer"), ("manager", "student")]
TEMPLATES = ["The {} said that", "The {} was promoted because", "My {} thinks", "The {} yelled that",
             "Yesterday the {} told us that"]


def _gpt2_small(folder: Path, bpe: Path):
    from biaslens.testing import gpt2_small

    return gpt2_small(folder, bpe)

class PeakRSS:
    """Peak resident memory (MB) above the level at entry, sampled from /proc every 5 ms."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.mb = self.peak - self.start


def make_prompts(model, n: int):
    clean, corrupt = [], []
    for i in range(len(PAIRS) * len(TEMPLATES)):
        occ, other = PAIRS[i % len(PAIRS)]
        t = TEMPLATES[(i // len(PAIRS)) % len(TEMPLATES)]
        if len(model.word_ids(" " + occ)) != len(model.word_ids(" " + other)):
            continue
        clean.append((t.format(occ), occ))
        corrupt.append((t.format(other), other))
        if len(clean) == n:
            break
    return clean, corrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="4 prompts (a smoke run of the same model)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "locate.md")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (default 1: on a CPU shared with other jobs, "
                         "more threads than free cores makes small ops spin and time out)")
    args = ap.parse_args(argv)
    n_prompts = 4 if args.quick else args.prompts

    import torch
    from transformer_lens import patching as tlp

    torch.set_num_threads(args.threads)

    import biaslens
    from biaslens.hooks import act_name
    from biaslens.locate.attribution import gradient_attribution
    from biaslens.locate.patching import (Base, PatchEngine, clean_source, patch_attn_out_by_pos,
                                          patch_mlp_out_by_pos, patch_resid_pre_by_pos)
    from biaslens.metrics import pronoun_log_ratio

    bpe = args.data_dir / "gpt2-bpe"
    if not (bpe / "encoder.json").exists():
        print(f"needs the GPT-2 BPE files in {bpe} (pass --data-dir)", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory()
    model = biaslens.load(_gpt2_small(Path(tmp.name) / "gpt2-small", bpe))
    clean_p, corrupt_p = make_prompts(model, n_prompts)
    cb, xb = model.encode(clean_p), model.encode(corrupt_p)
    assert torch.equal(cb.lengths, xb.lengths)
    metric = pronoun_log_ratio(model, clean_p)
    L, T, B = model.n_layers, xb.input_ids.shape[1], len(cb)
    last = xb.lengths - 1
    rows = torch.arange(B)
    hooks = {c: [act_name(h, l) for l in range(L)]
             for c, h in (("resid", "resid_pre"), ("mlp", "mlp_out"), ("attn", "attn_out"))}
    print(f"model: GPT-2-small shape, {model.n_params / 1e6:.0f}M params; {B} prompts, width {T}; "
          f"sites per component: {L} layers x {T} positions; torch threads {torch.get_num_threads()}")

    def tl_metric(logits):
        return metric(logits[torch.arange(B), last])

    tl_fns = {"resid": tlp.get_act_patch_resid_pre, "mlp": tlp.get_act_patch_mlp_out,
              "attn": tlp.get_act_patch_attn_out}
    ours_fns = {"resid": patch_resid_pre_by_pos, "mlp": patch_mlp_out_by_pos, "attn": patch_attn_out_by_pos}
    t_tl = t_ours = 0.0
    res_tl, res_ours = {}, {}
    mem = {}

    def run_tl(comp, cache_box):
        nonlocal t_tl
        with PeakRSS() as pk, torch.no_grad():
            t0 = time.perf_counter()
            if "cache" not in cache_box:
                cache_box["cache"] = model.bridge.run_with_cache(cb.input_ids)[1]
            res_tl[comp] = tl_fns[comp](model.bridge, xb.input_ids, cache_box["cache"], tl_metric,
                                        reduce="none").values
            t_tl += time.perf_counter() - t0
        mem["tl"] = max(mem.get("tl", 0.0), pk.mb)

    def run_ours(comp, box, skip_noops=True, res=res_ours, key="ours"):
        with PeakRSS() as pk, torch.no_grad():
            t0 = time.perf_counter()
            if "engine" not in box:
                src, _ = clean_source(model, cb, sum(hooks.values(), []), rows)
                base = Base(xb.input_ids, xb.attention_mask, xb.lengths, rows)
                box["engine"] = PatchEngine(model, base, {"clean": src}, metric, skip_noops=skip_noops,
                                            progress=False)
            res[comp] = ours_fns[comp](box["engine"])
            box["t"] = box.get("t", 0.0) + time.perf_counter() - t0
        mem[key] = max(mem.get(key, 0.0), pk.mb)

    # the engine with no-op skipping off: every site is computed, as TransformerLens does
    res_all = {}
    run_all = partial(run_ours, skip_noops=False, res=res_all, key="all")
    tl_box, our_box, all_box = {}, {}, {}
    boxes = {run_tl: tl_box, run_ours: our_box, run_all: all_box}
    for i, comp in enumerate(("resid", "mlp", "attn")):
        order = (run_tl, run_ours, run_all) if i % 2 == 0 else (run_all, run_ours, run_tl)
        for f in order:
            f(comp, boxes[f])
        print(f"  {comp}: TransformerLens {t_tl:.1f}s, biaslens {our_box['t']:.1f}s, biaslens computing "
              f"every site {all_box['t']:.1f}s (cumulative)", flush=True)
    t_ours, t_all = our_box["t"], all_box["t"]
    max_diff = max(float((res_tl[c] - r[c]).abs().max()) for c in res_tl for r in (res_ours, res_all))
    # what each side computes: block-token passes (x 12 d^2 MACs) and unembedded positions (x d V)
    st, st_all = our_box["engine"].stats, all_box["engine"].stats
    n_sites = 3 * L * T
    c_block, c_unembed = 12 * model.d_model ** 2, model.d_model * model.bridge.cfg.d_vocab
    work_tl = n_sites * B * T * (L * c_block + c_unembed)
    eng = our_box["engine"]
    n_cols = len(eng._cols[0]) if eng._cols is not None else model.bridge.cfg.d_vocab
    work_ours = st["block_tokens"] * c_block + st["unembed_rows"] * model.d_model * n_cols

    for box in boxes.values():
        box.clear()
    with PeakRSS() as pk:
        t0 = time.perf_counter()
        src, _ = clean_source(model, cb, sum(hooks.values(), []), rows)
        base = Base(xb.input_ids, xb.attention_mask, xb.lengths, rows)
        scores, base_metric = gradient_attribution(model, base, src, metric, sum(hooks.values(), []))
        attr = {c: torch.stack([scores[h].sum(-1).T for h in hooks[c]]) for c in hooks}  # [L, pos, B]
        t_attr = time.perf_counter() - t0
    mem["attr"] = pk.mb
    exact = torch.cat([(res_ours[c] - base_metric[None, None]).flatten() for c in hooks])
    approx = torch.cat([attr[c].flatten() for c in hooks])
    pearson = float(torch.corrcoef(torch.stack([exact, approx]))[0, 1])

    r_exact, r_all, r_attr = t_tl / t_ours, t_tl / t_all, t_tl / t_attr
    n_pairs = n_sites * B
    lines = [
        "# Locate speed: batched exact patching and attribution patching vs TransformerLens",
        "",
        f"GPT-2-small shape (12 layers, d_model 768, 12 heads, vocab 50,257, random weights, real "
        f"GPT-2 BPE); {B} prompts right-padded to {T} tokens; residual + MLP + attention outputs at "
        f"every layer x position = {n_sites} sites; metric log P(she) - log P(he) at each prompt's "
        f"last token. CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs), torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| method | wall time (s) | speed-up vs TL exact | target | peak extra RSS (MB) | check |",
        "|---|---:|---:|---:|---:|---|",
        f"| TransformerLens `patching` (1 forward per site) | {t_tl:.1f} | 1.0x | | {mem['tl']:.0f} | |",
        f"| biaslens exact (`PatchEngine`) | {t_ours:.1f} | {r_exact:.1f}x | >= 5x | {mem['ours']:.0f} | "
        f"max abs diff vs TL {max_diff:.1e} |",
        f"| biaslens exact, no-op skipping off (every site computed) | {t_all:.1f} | {r_all:.1f}x | | "
        f"{mem['all']:.0f} | same numbers |",
        f"| biaslens attribution patching | {t_attr:.2f} | {r_attr:.0f}x | >= 50x | {mem['attr']:.0f} | "
        f"Pearson r vs exact {pearson:.3f} |",
        "",
        f"Work (matmul MACs of blocks and unembedding): TransformerLens {work_tl / 1e12:.2f} T, biaslens "
        f"exact {work_ours / 1e12:.2f} T in {st['chunks']} batched chunks "
        f"({st['block_tokens']:,} block-token passes vs {n_sites * B * T * L:,}; {st['unembed_rows']:,} "
        f"unembedded positions vs {n_sites * B * T:,}): the engine does {work_tl / work_ours:.1f}x less "
        f"work and is {r_exact:.1f}x faster in wall time (per-call overheads on both sides and matmul "
        "efficiency at small batches make up the difference; both swing with load on a shared CPU).",
        "",
        f"No-op patches: of the {n_pairs:,} (site, prompt) pairs, {st['noop_rows']:,} set an activation to "
        "the value the corrupted run already has there (the BOS token and the shared first word "
        "before the occupation at every layer; the token embeddings of shared words at layer 0). "
        "Patching them cannot change the output, so the engine returns the corrupted run's value "
        "for them without a forward (a bitwise equality test: exact); TransformerLens runs them. "
        f"With that off, the engine does {st_all['block_tokens']:,} block-token passes and "
        f"{st_all['unembed_rows']:,} unembedded positions. The metric is a log-ratio of two single "
        "tokens, so both biaslens rows unembed only those two columns (`LogitMetric.columns`).",
        "",
        f"Command: `python benchmarks/locate.py{' --quick' if args.quick else f' --prompts {n_prompts}'}"
        f" --threads {args.threads}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if max_diff > 1e-4:
        print(f"MISMATCH: biaslens and TransformerLens differ by {max_diff:.2e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
