"""Speed of biaslens exact patching and attribution patching vs TransformerLens ``patching``.

    python benchmarks/locate.py [--data-dir DIR] [--prompts 10] [--quick] [--rounds 2] [--out FILE]

Model: GPT-2-small shape (12 layers, d_model 768, 12 heads, vocab 50,257), random weights, the
real GPT-2 BPE. Prompts: ``--prompts`` occupation prompts, each corrupted by swapping the
occupation for a word of the same token length. Sites: residual stream (``resid_pre``), MLP output
and attention output at every layer x position (the padded width), patched from the clean run
into the corrupted run; metric: log P(" she") - log P(" he") at each prompt's last real token.

- TransformerLens: its clean ``run_with_cache`` and ``patching.get_act_patch_resid_pre /
  get_act_patch_mlp_out / get_act_patch_attn_out(bridge, corrupted_tokens, clean_cache, metric,
  reduce="none")`` on the same TransformerBridge (one forward per (layer, position)).
- biaslens exact: :class:`biaslens.locate.patching.PatchEngine` with the clean run as a
  ``SourceRun`` (computed in the engine's base forward) and
  :func:`~biaslens.locate.patching.patch_by_pos` (the three sweeps in one run), with no-op
  skipping on, and off (every site computed, as TransformerLens does).
- biaslens attribution: :func:`biaslens.locate.attribution.attribution_scores` (the clean run, the
  corrupted forward and one backward, for every site of the three components); its agreement
  (Pearson r) with the exact values over the same (site, prompt) pairs is reported, over all of
  them and over those whose exact effect is not 0 by construction (not a no-op).

Each method runs ``--rounds`` times in alternating order (TL, ours, ours-all, attribution, then
the reverse, ...) so that load from other jobs on a shared CPU falls on all alike; a method's
time is its mean. Per-prompt values must agree with TransformerLens to 1e-4. Work is counted in
matmul multiply-accumulates (MACs) of what each side computes; where the wall ratio differs from
the work ratio the page says what else the time went to. Writes a markdown table to
docs/results/locate.md (``--out``).
"""

from __future__ import annotations

import argparse
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
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's per-site progress bars

ROOT = Path(__file__).resolve().parents[1]
from biaslens.data import ROOT as DEFAULT_DATA  # the shipped copies

# (clean occupation, corrupting word with the same number of GPT-2 tokens), checked at run time
PAIRS = [("nurse", "man"), ("secretary", "father"), ("dancer", "farmer"), ("doctor", "mother"),
         ("engineer", "teacher"), ("lawyer", "singer"), ("baker", "driver"), ("cashier", "janitor"),
         ("chef", "guard"), ("clerk", "pilot"), ("painter", "writer"), ("manager", "student")]
TEMPLATES = ["The {} said that", "The {} was promoted because", "My {} thinks", "The {} yelled that",
             "Yesterday the {} told us that"]
COMPONENTS = (("resid", "resid_pre"), ("mlp", "mlp_out"), ("attn", "attn_out"))


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
    """``n`` (clean, corrupted) prompt pairs whose occupation and corrupting word have the same
    number of tokens (TransformerLens patches position by position)."""
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


class Setup:
    """The benchmark's model, prompts, sites and metric (shared with tests/integration/test_locate_parity.py)."""

    def __init__(self, model, n_prompts: int):
        import torch

        from biaslens.hooks import act_name
        from biaslens.locate.patching import Base
        from biaslens.metrics import pronoun_log_ratio

        self.model = model
        self.clean_p, self.corrupt_p = make_prompts(model, n_prompts)
        self.cb, self.xb = model.encode(self.clean_p), model.encode(self.corrupt_p)
        assert torch.equal(self.cb.lengths, self.xb.lengths)
        self.metric = pronoun_log_ratio(model, self.clean_p)
        self.L, self.T, self.B = model.n_layers, int(self.xb.input_ids.shape[1]), len(self.cb)
        self.rows = torch.arange(self.B)
        self.hooks = {c: [act_name(h, l) for l in range(self.L)] for c, h in COMPONENTS}
        self.all_hooks = sum(self.hooks.values(), [])
        self.base = Base(self.xb.input_ids, self.xb.attention_mask, self.xb.lengths, self.rows)

    def tl(self) -> dict:
        """TransformerLens ``patching``: ``{component: [layer, pos, prompt]}``."""
        import torch
        from transformer_lens import patching as tlp

        fns = {"resid": tlp.get_act_patch_resid_pre, "mlp": tlp.get_act_patch_mlp_out,
               "attn": tlp.get_act_patch_attn_out}
        last = self.xb.lengths - 1

        def metric(logits):
            return self.metric(logits[torch.arange(self.B), last])

        with torch.no_grad():
            cache = self.model.bridge.run_with_cache(self.cb.input_ids)[1]
            return {c: fns[c](self.model.bridge, self.xb.input_ids, cache, metric, reduce="none").values
                    for c, _ in COMPONENTS}

    def ours(self, skip_noops: bool = True):
        """The batched engine: ``({component: [layer, pos, prompt]}, engine)``."""
        import torch

        from biaslens.locate.patching import PatchEngine, SourceRun, patch_by_pos

        with torch.no_grad():
            engine = PatchEngine(self.model, self.base, {"clean": SourceRun(self.cb, self.all_hooks, self.rows)},
                                 self.metric, skip_noops=skip_noops, progress=False)
            return patch_by_pos(engine), engine

    def attribution(self) -> tuple[dict, "object"]:
        """Attribution patching: ``({component: [layer, pos, prompt]} first-order effects, base metric)``."""
        import torch

        from biaslens.locate.attribution import attribution_scores

        scores, base_metric, _ = attribution_scores(self.model, self.cb, self.base, self.metric, self.all_hooks)
        return {c: torch.stack([scores[h].sum(-1).T for h in self.hooks[c]]) for c in self.hooks}, base_metric


def kernel_speed(d: int, n: int = 600, reps: int = 10) -> float:
    """How much faster the fused blocks' matmul (``fused_matmul``: oneDNN with the GELU fused in) runs
    than ``addmm`` then GELU, on an ``[n, d] @ [d, 4 d]`` product: the ratio of best-of times."""
    import torch

    from biaslens.locate.patching import fused_matmul

    x, w, b = torch.randn(n, d), torch.randn(d, 4 * d) * 0.02, torch.zeros(4 * d)
    fns = {"addmm": lambda: torch.nn.functional.gelu(torch.addmm(b, x, w), approximate="tanh"),
           "dense": lambda: fused_matmul(x, w, b, True, "gelu_tanh")}
    best = {}
    with torch.no_grad():
        for k, fn in fns.items():
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            best[k] = min(ts)
    return best["addmm"] / best["dense"]


def pearson(a, b) -> float:
    import torch

    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="4 prompts, 1 round (a smoke run of the same model)")
    ap.add_argument("--rounds", type=int, default=2, help="times each method runs, in alternating order")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "locate.md")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (default 1: on a CPU shared with other jobs, "
                         "more threads than free cores makes small ops spin and time out)")
    args = ap.parse_args(argv)
    n_prompts, rounds = (4, 1) if args.quick else (args.prompts, max(1, args.rounds))

    import torch

    torch.set_num_threads(args.threads)

    import biaslens
    from biaslens.testing import gpt2_small

    bpe = args.data_dir / "gpt2-bpe"
    if not (bpe / "encoder.json").exists():
        print(f"needs the GPT-2 BPE files in {bpe} (pass --data-dir)", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory()
    model = biaslens.load(gpt2_small(Path(tmp.name) / "gpt2-small", bpe))
    s = Setup(model, n_prompts)
    L, T, B, d, V = s.L, s.T, s.B, model.d_model, int(model.bridge.cfg.d_vocab)
    n_sites = len(COMPONENTS) * L * T
    print(f"model: GPT-2-small shape, {model.n_params / 1e6:.0f}M params; {B} prompts, width {T}; "
          f"sites per component: {L} layers x {T} positions; torch threads {torch.get_num_threads()}; "
          f"{rounds} round(s)", flush=True)

    times: dict[str, list[float]] = {k: [] for k in ("tl", "ours", "all", "attr")}
    mem: dict[str, float] = {}
    res: dict[str, object] = {}

    cpu: dict[str, list[float]] = {k: [] for k in times}

    def timed(key, fn):
        with PeakRSS() as pk:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
        mem[key] = max(mem.get(key, 0.0), pk.mb)
        res[key] = out

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    order = [("tl", s.tl), ("ours", s.ours), ("all", lambda: s.ours(skip_noops=False)), ("attr", s.attribution)]
    for r in range(rounds):
        for key, fn in (order if r % 2 == 0 else order[::-1]):
            timed(key, fn)
            print(f"  round {r + 1}: {key} {times[key][-1]:.2f}s", flush=True)

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t = {k: sum(v) / len(v) for k, v in times.items()}
    tc = {k: sum(v) / len(v) for k, v in cpu.items()}
    cratio = {k: tc["tl"] / tc[k] for k in ("ours", "all", "attr")}
    tl = res["tl"]
    ours, eng = res["ours"]
    every, eng_all = res["all"]
    attr, base_metric = res["attr"]
    comps = [c for c, _ in COMPONENTS]
    diff = max(float((tl[c] - ours[c]).abs().max()) for c in comps)
    diff_all = max(float((tl[c] - every[c]).abs().max()) for c in comps)
    exact = torch.cat([(ours[c] - eng.base_metric[None, None]).flatten() for c in comps])
    approx = torch.cat([attr[c].flatten() for c in comps])
    r_all = pearson(exact, approx)
    live = exact != 0  # not 0 by construction (no-op patches, padding positions)
    r_live = pearson(exact[live], approx[live])

    # ---- work in MACs: one block pass of one position = 12 d^2 (q, k, v, output: 4 d^2; MLP: 8 d^2)
    c_block, c_kv, c_mlp, c_head = 12 * d * d, 2 * d * d, 8 * d * d, d * V
    work_tl = (n_sites + 1) * B * T * (L * c_block + c_head)  # 216 patched forwards + the clean run
    # the engine's base forward, clean rows riding along, stopped at the final norm (the metric's
    # columns unembedded at the last tokens; the full logits only if someone reads them)
    base_run = 2 * B * T * L * c_block + B * d * (len(eng._cols[0]) if eng._cols is not None else V)

    def engine_work(st):
        return (st["block_tokens"] * c_block + st["attn_tokens"] * c_kv + st["mlp_tokens"] * c_mlp
                + st["unembed_rows"] * d * (len(eng._cols[0]) if eng._cols is not None else V) + base_run)

    work_ours, work_all = engine_work(eng.stats), engine_work(eng_all.stats)
    lengths = s.cb.lengths
    from biaslens.locate.attribution import shared_prefix

    skip = shared_prefix(s.cb, s.base, s.rows)
    n_clean, n_corr = int(lengths.sum()), int((s.xb.lengths - skip).sum())
    # the clean run and the corrupted run from the shared prefix on, in one call per block (the
    # final block whole at the last position only), and the corrupted rows' backward (gradients
    # of activations only: the forward's MACs)
    def fused_pass(tokens, rows):
        return tokens * (L - 1) * c_block + (tokens - rows) * c_kv + rows * c_block

    work_attr = fused_pass(n_clean, B) + 2 * fused_pass(n_corr, B) + 2 * B * d * 2
    ratio = {k: t["tl"] / t[k] for k in ("ours", "all", "attr")}
    wratio = {"ours": work_tl / work_ours, "all": work_tl / work_all, "attr": work_tl / work_attr}

    st, st_all = eng.stats, eng_all.stats
    tl_calls = (n_sites + 1) * L
    from biaslens.locate.patching import onednn_ready

    onednn = ("; its matmuls, no gradient recorded, as oneDNN matmuls with the GELU fused in: "
              f"{kernel_speed(d):.2f}x the speed of `addmm` then GELU on the MLP's first matmul at 600 positions "
              "in this run" if onednn_ready()
              else "; its matmuls through `addmm` (oneDNN's fused matmul is not available here)")
    lines = [
        "# Locate speed: batched exact patching and attribution patching vs TransformerLens",
        "",
        f"GPT-2-small shape (12 layers, d_model 768, 12 heads, vocab 50,257, random weights, real "
        f"GPT-2 BPE); {B} prompts right-padded to {T} tokens; residual + MLP + attention outputs at "
        f"every layer x position = {n_sites} sites; metric log P(she) - log P(he) at each prompt's "
        f"last token. CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs), torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"each method run {rounds} time(s) in alternating order, mean wall time.",
        "",
        "| method | wall time (s) | wall ratio vs TL | CPU time (s) | CPU-time ratio | work ratio (MACs) | target | peak extra RSS (MB) | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| TransformerLens `patching` (1 forward per site, + clean cache) | {t['tl']:.1f} | 1.0x | {tc['tl']:.1f} | 1.0x | 1.0x | | "
        f"{mem['tl']:.0f} | |",
        f"| biaslens exact (`PatchEngine` + `patch_by_pos`) | {t['ours']:.2f} | **{ratio['ours']:.1f}x** | "
        f"{tc['ours']:.2f} | {cratio['ours']:.1f}x | "
        f"{wratio['ours']:.1f}x | >= 20x | {mem['ours']:.0f} | max abs diff vs TL {diff:.1e} |",
        f"| biaslens exact, no-op skipping off (every site computed) | {t['all']:.2f} | **{ratio['all']:.1f}x** | "
        f"{tc['all']:.2f} | {cratio['all']:.1f}x | "
        f"{wratio['all']:.1f}x | >= 10x | {mem['all']:.0f} | max abs diff vs TL {diff_all:.1e} |",
        f"| biaslens attribution patching (`attribution_scores`) | {t['attr']:.2f} | **{ratio['attr']:.0f}x** | "
        f"{tc['attr']:.2f} | {cratio['attr']:.0f}x | "
        f"{wratio['attr']:.0f}x | >= 150x | {mem['attr']:.0f} | Pearson r vs exact {r_all:.3f} "
        f"({r_live:.3f} over the {int(live.sum())} non-zero effects) |",
        "",
        f"Work (MACs of every matmul that projects or unembeds; attention scores, norms and "
        f"activations are not counted): TransformerLens {work_tl / 1e12:.2f} T ({n_sites} patched "
        f"forwards and the clean one: {tl_calls:,} block calls of {B * T} positions and "
        f"{n_sites + 1} full-vocabulary unembeddings of {B * T} positions). biaslens exact "
        f"{work_ours / 1e9:.0f} G: one base forward ({B} corrupted + {B} clean rows, stopped at the "
        f"final norm: the corrupted rows' last tokens unembedded at the 2 pronoun columns, the full "
        f"logits only where read), then {st['block_calls']} {'fused' if eng.fused else 'bridge'} block calls ({st['block_tokens']:,} positions "
        f"through whole blocks, {st['attn_tokens']:,} final-block positions through keys and values "
        f"only, {st['mlp_tokens']:,} positions through one block's MLP alone for the attention-output "
        f"patches, {st['unembed_rows']:,} last tokens unembedded at the 2 pronoun columns); with no-op "
        f"skipping off {work_all / 1e9:.0f} G ({st_all['block_calls']} block calls, "
        f"{st_all['block_tokens']:,} + {st_all['attn_tokens']:,} + {st_all['mlp_tokens']:,} positions). "
        f"Attribution {work_attr / 1e9:.1f} G: the clean forward ({n_clean} positions) and the "
        f"corrupted forward from position {skip} on ({n_corr} positions: the {skip} leading "
        f"positions every corrupted prompt shares with its clean one are run once, in the clean "
        f"run, and score exactly 0) in one call per block, and the corrupted rows' backward "
        f"(activation gradients only).",
        "",
        f"Where the wall ratio differs from the work ratio: the counted work ran at "
        f"{work_tl / t['tl'] / 1e9:.1f} GMAC/s of wall time in TransformerLens, "
        f"{work_ours / t['ours'] / 1e9:.1f} in biaslens exact ({work_all / t['all'] / 1e9:.1f} with no-op "
        f"skipping off) and {work_attr / t['attr'] / 1e9:.1f} in attribution. "
        f"TransformerLens's time is nearly all "
        f"matmuls at {B * T} positions a call, while each biaslens call also carries per-call costs "
        f"(every block's weights read from memory once per call: ~28 MB at d_model 768; the engine's "
        f"check of its shortcuts against the bridge's base forward, {eng.checks} short "
        f"re-entries; Python) and the work not counted above (attention over cached keys, layer "
        f"norms, GELU). At a few dozen positions a call a block's matmuls are bound by reading its "
        f"weights, not by their MACs (a full-vocabulary unembedding, 154 MB, costs ~65 ms at 10 "
        f"rows): so attribution runs its clean and corrupted rows through each block together "
        f"(one pass over the weights instead of two; the backward computes input gradients at the "
        f"corrupted rows only), and its backward costs more per MAC than a forward (its "
        f"elementwise gradients). On this shared CPU the ratios move with the load of other jobs "
        f"(1-minute load average {load0:.1f} at the start of this run, {load1:.1f} at its end, on "
        f"{os.cpu_count()} cores): under heavy load the engine's large matmuls lose more speed than "
        f"TransformerLens's small ones, and its wall ratios drop by up to ~2x between runs; the "
        f"CPU-time ratio (this process's CPU seconds, one thread) moves less, though other jobs on "
        f"the same cores still slow each CPU second through the shared caches and memory.",
        "",
        f"No-op patches: of the {n_sites * B:,} (site, prompt) pairs, {st['noop_rows']:,} set an "
        f"activation to the value the corrupted run already has there (the BOS token and the shared "
        f"first word before the occupation at every layer; the token embeddings of shared words at "
        f"layer 0). Patching them cannot change the output, so the engine returns the corrupted "
        f"run's value for them without a forward (a bitwise equality test: exact); TransformerLens "
        f"runs them, and so does the engine with no-op skipping off. Patches at padding positions "
        f"(after a prompt's last token), and patches of the final block's attention or MLP output "
        f"at a position other than the last (no later block reads them), are the base value in "
        f"both modes without a forward (causal attention). An attention-output patch at layer l "
        f"sets the next block's input at its positions alone, to m + MLP(m) with m = resid_pre + "
        f"the clean attention output (block l's residual sums are checked bitwise on the base "
        f"run), so block l runs its MLP at those positions only. "
        f"The engine {'ran' if eng.fused else 'did not run (its check failed)'} GPT-2's blocks as fused ops on the bridge's own weights "
        f"(`FusedGPT2`: one q/k/v matmul, `scaled_dot_product_attention`, fused layer norm and "
        f"GELU{onednn}) after checking them against the bridge's forward; an MLP-output patch is set as the "
        f"next block's input (the block output is `resid_mid + mlp_out` bitwise, checked on the "
        f"base run); rows are grouped by (first changed position, length) so that no call computes "
        f"padding or an unchanged position.",
        "",
        f"Command: `python benchmarks/locate.py{' --quick' if args.quick else f' --prompts {n_prompts} --rounds {rounds}'}"
        f" --threads {args.threads}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if max(diff, diff_all) > 1e-4:
        print(f"MISMATCH: biaslens and TransformerLens differ by {max(diff, diff_all):.2e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
