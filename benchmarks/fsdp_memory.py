"""Peak memory of distributed PCGU per rank against one process holding the whole model.

    python benchmarks/fsdp_memory.py [--layers 24] [--d-model 1024] [--vocab 2000]
                                     [--batch-size 8] [--k 10000] [--quick]

One run, CPU only, every process on one thread. For each measured configuration:

(a) one process: ``biaslens.load`` (the whole model), one step of the PCGU loop that
    ``pcgu_fsdp`` runs (:func:`biaslens.unlearn.partitioned.run` with the one-process engine: the
    like-for-like baseline), ``delta.save``, then (main configuration only) ``biaslens.export``;
    for the main configuration also, in a process of its own, the public :func:`biaslens.unlearn.pcgu`
    on the same step (no strength selection, no keep term);
(b) ``torchrun --nproc_per_node=2`` with gloo: :func:`biaslens.unlearn.distributed.load_sharded`
    (the model built on meta, each rank reading only its rows from the safetensors file), one
    step of :func:`~biaslens.unlearn.distributed.pcgu_fsdp` on the same pairs,
    ``ShardedDelta.save`` (streamed to rank 0 one tensor at a time), then (main configuration
    only) the ``--out`` export: rank 0 loads the whole model once more, because the export writes
    and verifies whole tensors.

Each process records its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
after its imports (the baseline: interpreter, torch, transformers with the GPT-2 modelling code,
TransformerLens and biaslens — the same set in every process; on the ranks also the gloo process
group), after loading, at the start of the step (after PCGU's snapshot of the trained tensors),
after ``g_a``, after ``g_d`` (the benchmark wraps :func:`biaslens.unlearn.partitioned.side_grads` to take
these two marks; nothing else changes), after the step and its delta, after saving the delta and
after the export. "Net" is a peak minus the baseline. The ratio compares each rank's peak through
load + step + delta with the one process's. Model building and the delta comparison run in their
own processes: Linux carries a parent's peak RSS into a child started from it, so the process
that launches the measured ones must stay small.

Both sides use the allocator setting the torchrun entry point applies
(:func:`biaslens.unlearn.distributed.fixed_mmap_threshold`); the main model is also measured with
glibc's default, to show what that setting saves.

Models (random weights, fp32, ``save_pretrained`` into a temporary folder):

* ``blocks`` (main): ``biaslens.testing.tiny_model("gpt2", n_layers=24, d_model=1024)`` — GPT-2
  medium's depth and width — with a 2,000-token SentencePiece-style vocabulary: the transformer
  blocks hold ~99% of the parameters;
* ``gpt2-small``: ``biaslens.testing.gpt2_small`` (12 × 768, GPT-2's 50,257-token BPE): its tied
  embedding is 31% of the parameters and, in FSDP's root group, is gathered whole on every rank
  for the forward and backward passes.

Prints the page and writes ``docs/results/fsdp_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "fsdp_memory.md"
TARGET = 0.6
MB = 2**20
STEP_MARKS = ("load", "step start", "after g_a", "after g_d", "step + delta")


# ----------------------------------------------------------------------------- inside a process


class Marks:
    """``ru_maxrss`` (peak so far) and the current RSS at named points, in bytes."""

    def __init__(self):
        self.points: dict[str, dict[str, int]] = {}

    def mark(self, name: str) -> None:
        import resource

        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        self.points[name] = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "now": now}


def _imports() -> None:
    """The modules every measured process imports before its baseline."""
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformer_lens.model_bridge  # noqa: F401
    import transformers  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel  # noqa: F401  (the modelling code)

    import biaslens  # noqa: F401
    import biaslens.delta  # noqa: F401
    import biaslens.export  # noqa: F401
    import biaslens.unlearn.distributed  # noqa: F401
    import biaslens.unlearn.partitioned  # noqa: F401


def _setup(a) -> Marks:
    """Imports, one thread, the allocator setting; the baseline mark; marks around each side."""
    _imports()
    import torch

    from biaslens.unlearn.distributed import fixed_mmap_threshold

    torch.set_num_threads(1)
    if a.allocator == "fixed" and not fixed_mmap_threshold():
        raise SystemExit("could not fix the mmap threshold (not glibc?); run with --allocator default")
    m = Marks()
    pcgu_mod = sys.modules["biaslens.unlearn.partitioned"]
    inner = pcgu_mod.side_grads

    def side_grads(*args, **kw):  # instrumentation only: the same call, with RSS marks around it
        if "step start" not in m.points:
            m.mark("step start")
        out = inner(*args, **kw)
        m.mark("after g_a" if "after g_a" not in m.points else "after g_d")
        return out

    pcgu_mod.side_grads = side_grads
    return m


def _pcgu_kwargs(a) -> dict:
    """The same step on both sides: one batch, every 1-D and 2-D parameter, sentence form."""
    return {"k": a.k, "lr": a.lr, "batch_size": a.batch_size, "max_steps": 1, "progress": False,
            "params": None, "form": "sentence", "epochs": 1}


def _single_kwargs(a) -> dict:
    """:func:`biaslens.unlearn.pcgu` as the FSDP engine runs it: no strength selection and no keep
    term (both run in one process only), where this version of ``pcgu`` has them."""
    import inspect

    from biaslens.unlearn.partitioned import pcgu

    extra = {k: v for k, v in (("validation", None), ("keep_weight", 0.0)) if k in inspect.signature(pcgu).parameters}
    return {**_pcgu_kwargs(a), **extra}


def worker_single(a) -> None:
    m = _setup(a)
    import biaslens
    from biaslens.export import export
    from biaslens.unlearn import organism_pairs
    from biaslens.unlearn.partitioned import Engine, PCGUConfig, pcgu, run

    m.mark("imports")
    model = biaslens.load(a.model)
    m.mark("load")
    t0 = time.perf_counter()
    if a.entry == "run":  # the loop pcgu_fsdp runs, on one process
        cfg = PCGUConfig(k=a.k, lr=a.lr, batch_size=a.batch_size, epochs=1, max_steps=1, form="sentence")
        delta = run(model, organism_pairs(), cfg, Engine(), params=None, progress=False)
    else:
        delta = pcgu(model, organism_pairs(), **_single_kwargs(a))
    seconds = time.perf_counter() - t0
    m.mark("step + delta")
    delta.save(Path(a.out) / f"single_{a.entry}.safetensors")
    m.mark("save")
    if a.export:
        export(model, Path(a.out) / f"single_{a.entry}_export", delta=delta)
        m.mark("export")
    param_bytes = sum(p.numel() * p.element_size() for p in model.params.values())
    blocks = tuple(model.arch.block.format(layer=i) + "." for i in range(model.n_layers))
    root_bytes = sum(p.numel() * p.element_size() for n, p in model.params.items() if not n.startswith(blocks))
    rec = {"kind": "single", "marks": m.points, "param_bytes": param_bytes, "root_bytes": root_bytes,
           "seconds": seconds,
           "units_sha1": [h["units_sha1"] for h in delta.info["history"]], "changed": delta.names}
    (Path(a.out) / f"single_{a.entry}.json").write_text(json.dumps(rec))


def worker_fsdp(a) -> None:
    m = _setup(a)
    import torch.distributed as dist

    from biaslens.unlearn import organism_pairs
    from biaslens.unlearn.distributed import load_sharded, pcgu_fsdp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    m.mark("imports")
    model = load_sharded(a.model)
    m.mark("load")
    local = sum(p.to_local().numel() * p.element_size() for p in model.params.values())
    total = sum(p.numel() * p.element_size() for p in model.params.values())
    t0 = time.perf_counter()
    delta = pcgu_fsdp(model, organism_pairs(), **_pcgu_kwargs(a))
    seconds = time.perf_counter() - t0
    m.mark("step + delta")
    del model
    delta.save(Path(a.out) / "fsdp.safetensors")
    m.mark("save")
    if a.export:
        base = None
        if rank == 0:
            import biaslens

            base = biaslens.load(a.model)
        whole = delta.to_delta(base, dst=0, release=True)
        if rank == 0:
            from biaslens.export import export

            export(base, Path(a.out) / "fsdp_export", delta=whole)
        del base, whole
        m.mark("export")
    rec = {"kind": "fsdp", "rank": rank, "marks": m.points, "param_bytes": total, "local_param_bytes": local,
           "seconds": seconds, "units_sha1": [h["units_sha1"] for h in delta.info["history"]],
           "changed": delta.names, "shard": delta.info["ranks"][rank]}
    (Path(a.out) / f"fsdp_rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


def worker_build(a) -> None:
    """Save the random model ``a.family`` into ``a.model``; prints its parameter count."""
    from biaslens.testing import gpt2_small, metaspace_tokenizer, tiny_model

    if a.family == "blocks":
        tiny_model("gpt2", a.model, n_layers=a.layers, d_model=a.d_model, positions=128,
                   tokenizer=metaspace_tokenizer(a.vocab))
    else:
        gpt2_small(a.model)


def worker_compare(a) -> None:
    """The largest difference between each one-process delta file and the FSDP one (JSON on stdout)."""
    from safetensors.torch import load_file

    d2 = load_file(str(Path(a.out) / "fsdp.safetensors"))
    out = {}
    for f in sorted(Path(a.out).glob("single_*.safetensors")):
        d1 = load_file(str(f))
        same = sorted(d1) == sorted(d2)
        diff = max((float((d1[n] - d2[n]).abs().max()) for n in d1), default=0.0) if same else None
        out[f.stem.removeprefix("single_")] = {"same_tensors": same, "max_delta_diff": diff, "n_changed": len(d1)}
    print(json.dumps(out))


# ----------------------------------------------------------------------------- the driver


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _me(worker: str, a, **kw) -> list[str]:
    args = ["--worker", worker, "--k", str(a.k), "--lr", str(a.lr), "--batch-size", str(a.batch_size),
            "--layers", str(a.layers), "--d-model", str(a.d_model), "--vocab", str(a.vocab)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)] if v is not True else [f"--{k.replace('_', '-')}"]
    return args


def measure(a, name: str, model: Path, out: Path, allocator: str, export: bool, public: bool = False) -> dict:
    """One configuration: the one-process loop (and, with ``public``, ``pcgu()`` itself), then the
    2 ranks, then the comparison of their deltas."""
    out.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve())
    kw = {"model": model, "out": out, "allocator": allocator}
    if not export:
        kw["no_export"] = True
    subprocess.run([sys.executable, here, *_me("single", a, entry="run", **kw)], env=_env(), check=True, cwd=ROOT)
    if public:
        subprocess.run([sys.executable, here, *_me("single", a, entry="pcgu", **{**kw, "no_export": True})],
                       env=_env(), check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    here, *_me("fsdp", a, **kw)], env=_env(), check=True, cwd=ROOT)
    cmp_ = subprocess.run([sys.executable, here, *_me("compare", a, out=out)], env=_env(), check=True,
                          cwd=ROOT, capture_output=True, text=True)
    single = json.loads((out / "single_run.json").read_text())
    public_rec = json.loads((out / "single_pcgu.json").read_text()) if public else None
    ranks = [json.loads((out / f"fsdp_rank{r}.json").read_text()) for r in range(2)]
    cmp_ = json.loads(cmp_.stdout.strip().splitlines()[-1])
    return {"name": name, "allocator": allocator, "single": single, "public": public_rec, "ranks": ranks,
            "same_units": all(r["units_sha1"] == single["units_sha1"] for r in ranks)
            and (public_rec is None or public_rec["units_sha1"] == single["units_sha1"]),
            "same_tensors": all(c["same_tensors"] for c in cmp_.values()),
            "max_delta_diff": max(c["max_delta_diff"] or 0.0 for c in cmp_.values()),
            "n_changed": cmp_["run"]["n_changed"]}


def _mb(x: float) -> str:
    return f"{x / MB:,.0f}"


def _net(rec: dict, phase: str = "step + delta") -> int:
    return rec["marks"][phase]["peak"] - rec["marks"]["imports"]["peak"]


def ratios(res: dict) -> tuple[float, float]:
    """Worst rank's raw and net peak through load + step + delta over the one process's."""
    s = res["single"]
    raw = max(r["marks"]["step + delta"]["peak"] for r in res["ranks"]) / s["marks"]["step + delta"]["peak"]
    net = max(_net(r) for r in res["ranks"]) / _net(s)
    return raw, net


def table(res: dict) -> list[str]:
    s = res["single"]
    head = ("| process | baseline (imports) | " + " | ".join(f"peak: {m}" for m in STEP_MARKS)
            + " | net peak | raw ratio | net ratio |")
    lines = [head, "|---|" + "---:|" * (len(STEP_MARKS) + 4)]
    rows = [("one process, whole model (the loop `pcgu_fsdp` runs)", s, False)]
    if res.get("public"):
        rows.append(("one process, `pcgu()` (no selection, no keep term)", res["public"], False))
    rows += [(f"FSDP rank {r['rank']} of 2", r, True) for r in res["ranks"]]
    for label, rec, bold in rows:
        mk = rec["marks"]
        cells = [label, _mb(mk["imports"]["peak"])] + [_mb(mk[k]["peak"]) for k in STEP_MARKS] + [_mb(_net(rec))]
        b = "**" if bold else ""
        cells += [f"{b}{mk['step + delta']['peak'] / s['marks']['step + delta']['peak']:.2f}{b}",
                  f"{b}{_net(rec) / _net(s):.2f}{b}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def increments(rec: dict, p: int) -> str:
    """Peak increments between the marks, in MB and in units of the parameter bytes P."""
    mk, parts, prev = rec["marks"], [], "imports"
    for k in STEP_MARKS:
        d = mk[k]["peak"] - mk[prev]["peak"]
        parts.append(f"{k} +{_mb(d)} ({d / p:.2f} P)")
        prev = k
    return "; ".join(parts)


def section(res: dict, describe: str, full: bool = True) -> list[str]:
    s, ranks = res["single"], res["ranks"]
    p = s["param_bytes"]
    raw, net = ratios(res)
    ok = "meets" if max(raw, net) <= TARGET else "misses"
    sh = [r["shard"] for r in ranks]
    lines = [f"{describe}: P = {_mb(p)} MB of fp32 parameters; the ranks hold {_mb(ranks[0]['local_param_bytes'])}"
             f" and {_mb(ranks[1]['local_param_bytes'])} MB and read {sh[0]['read_elements']:,} and "
             f"{sh[1]['read_elements']:,} of the {sh[0]['params']:,} parameters from the checkpoint "
             f"({sh[0]['whole_tensors_read']} and {sh[1]['whole_tensors_read']} whole multi-row tensors).", "",
             "Peak RSS in MB (`ru_maxrss`, never decreasing) at each mark:", ""]
    lines += table(res)
    lines += ["", f"Target ≤ {TARGET}× at 2 ranks: **{ok}** (worst rank: raw {raw:.2f}×, net {net:.2f}×).", "",
              "Peak increments: one process — " + increments(s, p) + ".", "",
              "Rank 0 — " + increments(ranks[0], p) + ".", ""]
    if full:
        lines += [f"Saving the delta ({res['n_changed']} tensors): peak {_mb(s['marks']['save']['peak'])} MB in one "
                  f"process, {_mb(ranks[0]['marks']['save']['peak'])} and {_mb(ranks[1]['marks']['save']['peak'])} "
                  "MB on the ranks (streamed to rank 0 one tensor at a time).", ""]
    if "export" in s["marks"]:
        se = s["marks"]["export"]["peak"]
        re0, re1 = (r["marks"]["export"]["peak"] for r in ranks)
        rise = ("did not rise above its step's peak" if se <= s["marks"]["save"]["peak"] else f"rose to {_mb(se)} MB")
        lines += [f"Export (`--out`, after training, measured on its own): the export writes and verifies whole "
                  f"tensors, so rank 0 loads the whole model once more and receives the updated tensors one at a "
                  f"time — its peak rose to {_mb(re0)} MB ({re0 / s['marks']['step + delta']['peak']:.2f}× the one "
                  f"process's step peak; rank 1: {_mb(re1)} MB). In one process the export's peak {rise}.", ""]
    lines += [f"Same selected units: {res['same_units']}; same changed tensors: {res['same_tensors']}; largest "
              f"difference between the two deltas: {res['max_delta_diff']:.2g}. Step time: {s['seconds']:.1f} s in "
              f"one process, {max(r['seconds'] for r in ranks):.1f} s on 2 ranks (shared CPU).", ""]
    return lines


def explain(main: dict, default: dict | None, small: dict | None) -> list[str]:
    """What holds each process's memory, from the measured increments."""

    def inc(rec, a_, b_):
        return rec["marks"][b_]["peak"] - rec["marks"][a_]["peak"]

    def transient(res):  # what g_a adds on a rank beyond its own rows of the gradient
        r0 = res["ranks"][0]
        return inc(r0, "step start", "after g_a") - r0["local_param_bytes"]

    s, r0 = main["single"], main["ranks"][0]
    p = s["param_bytes"]
    lines = ["## What holds the memory", "",
             f"Main model (P = {_mb(p)} MB). **One process**: loading adds {inc(s, 'imports', 'load') / p:.2f} P "
             "(transformers memory-maps the safetensors file, so the weights become resident when the step first "
             f"reads them); the step's start adds {inc(s, 'load', 'step start') / p:.2f} P — the weights themselves "
             "and the snapshot PCGU keeps of every trained tensor (1 P each); g_a adds "
             f"{inc(s, 'step start', 'after g_a') / p:.2f} P and g_d {inc(s, 'after g_a', 'after g_d') / p:.2f} P "
             "(g_a is held while g_d is computed). About 4 P in all."]
    pub = main.get("public")
    if pub:
        lines[-1] += (f" `pcgu()` itself peaks {_net(pub) / _net(s):.2f}× as high (net): its step start adds "
                      f"{inc(pub, 'load', 'step start') / p:.2f} P, because it snapshots the trained tensors for its "
                      "strength selection and the loop then takes its own snapshot. The ratios above compare the "
                      "ranks with the loop, like for like.")
    lines += ["",
             f"**A rank** holds its half of each: loading adds {inc(r0, 'imports', 'load') / p:.2f} P (its rows), the "
             f"snapshot {inc(r0, 'load', 'step start') / p:.2f} P, g_d {inc(r0, 'after g_a', 'after g_d') / p:.2f} P; "
             f"g_a adds {inc(r0, 'step start', 'after g_a') / p:.2f} P, of which {_mb(transient(main))} MB "
             "(beyond its rows of the gradient) are FSDP's transients: a block's gathered weights, its whole "
             "gradient before the reduce-scatter, the next block prefetched, and the root group "
             f"(embeddings and final norm, {_mb(s['root_bytes'])} MB here) gathered whole. These do not shrink with "
             f"more ranks, and neither does the import floor ({_mb(r0['marks']['imports']['peak'])} MB), which is "
             "why the raw ratio is above the net one."]
    if default is not None:
        dr, dn = ratios(default)
        lines += ["", f"**Allocator.** With glibc's default (dynamic) mmap threshold the same run gives raw {dr:.2f}×, "
                      f"net {dn:.2f}×: g_a adds {_mb(transient(default))} MB of transients on rank 0 instead of "
                      f"{_mb(transient(main))} MB (one process: net peak {_mb(_net(default['single']))} MB against "
                      f"{_mb(_net(s))} MB). FSDP frees a block's gathered weights and gradients at every layer; glibc "
                      "then raises its threshold to the size of each freed buffer (up to 32 MiB) and serves later "
                      "buffers from the heap, which keeps what is freed. The torchrun entry point therefore fixes the "
                      "threshold (`biaslens.unlearn.distributed.fixed_mmap_threshold`; `MALLOC_MMAP_THRESHOLD_` "
                      "overrides it)."]
    if small is not None:
        sr, sn = ratios(small)
        ss = small["single"]
        lines += ["", f"**GPT-2 small**: raw {sr:.2f}×, net {sn:.2f}× — above the target. Its root group (the "
                      f"50,257 × 768 embedding, tied to the output layer, plus positions and final norm) is "
                      f"{_mb(ss['root_bytes'])} MB, {ss['root_bytes'] / ss['param_bytes']:.0%} of P. The input "
                      "embedding and the output layer share that tensor and only the root module calls both, so it "
                      "stays in FSDP's root group: every rank gathers it whole for the forward pass and holds it, "
                      "with its whole gradient, until the backward pass ends — here g_a adds "
                      f"{_mb(transient(small))} MB of transients on rank 0, about twice the root group plus the "
                      "block transients. That part does not shrink with more ranks; a model with untied embeddings "
                      "could shard them in groups of their own."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["single", "fsdp", "build", "compare"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--family", default="blocks", help=argparse.SUPPRESS)
    ap.add_argument("--allocator", default="fixed", choices=["fixed", "default"], help=argparse.SUPPRESS)
    ap.add_argument("--entry", default="run", choices=["run", "pcgu"], help=argparse.SUPPRESS)
    ap.add_argument("--no-export", dest="export", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--quick", action="store_true",
                    help="the main model only (no glibc-default run, no GPT-2 small)")
    ap.add_argument("--write", default=str(OUT), help="the results page (default docs/results/fsdp_memory.md)")
    a = ap.parse_args(argv)
    if a.worker:
        {"single": worker_single, "fsdp": worker_fsdp, "build": worker_build, "compare": worker_compare}[a.worker](a)
        return 0

    here = str(Path(__file__).resolve())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fsdp_memory_") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, here, *_me("build", a, family="blocks", model=tmp / "blocks")],
                       env=_env(), check=True, cwd=ROOT)
        main_res = measure(a, "blocks", tmp / "blocks", tmp / "blocks_fixed", "fixed", export=True, public=True)
        default_res = small_res = None
        if not a.quick:
            default_res = measure(a, "blocks", tmp / "blocks", tmp / "blocks_default", "default", export=False)
            subprocess.run([sys.executable, here, *_me("build", a, family="gpt2-small", model=tmp / "small")],
                           env=_env(), check=True, cwd=ROOT)
            small_res = measure(a, "gpt2-small", tmp / "small", tmp / "small_fixed", "fixed", export=False)
    flags = [f"--layers {a.layers}" if a.layers != 24 else "", f"--d-model {a.d_model}" if a.d_model != 1024 else "",
             f"--vocab {a.vocab}" if a.vocab != 2000 else "",
             f"--batch-size {a.batch_size}" if a.batch_size != 8 else "",
             f"--k {a.k}" if a.k != 10_000 else "", "--quick" if a.quick else ""]
    cmd = " ".join(["python benchmarks/fsdp_memory.py", *[f for f in flags if f]])
    raw, net = ratios(main_res)
    lines = ["# Distributed PCGU memory: FSDP ranks vs one process", "",
             f"One run of `{cmd}` ({time.perf_counter() - t0:.0f} s; CPU, gloo, 2 ranks, one thread per process; "
             f"one PCGU step on {a.batch_size} organism pairs, k = {a.k:,}). Peak RSS is each process's `ru_maxrss`; "
             "the baseline is the same process right after importing torch, transformers (with the GPT-2 "
             "modelling code), TransformerLens and biaslens (on the ranks also after starting the gloo group). "
             "Ratios: a rank's peak through load + step + delta over the one process's.", "",
             f"**Result: a rank peaks at {raw:.2f}× the one process's RSS ({net:.2f}× net of the import floor) "
             f"on the main model — target ≤ {TARGET}×: {'met' if max(raw, net) <= TARGET else 'missed'}.**", "",
             f"## Main model: GPT-2, {a.layers} layers × d_model {a.d_model}, {a.vocab:,}-token vocabulary", ""]
    lines += section(main_res, "Main model")
    if default_res is not None:
        lines += ["## The same model with glibc's default allocator settings", ""]
        lines += section(default_res, "Main model, glibc default mmap threshold", full=False)
    if small_res is not None:
        lines += ["## GPT-2 small (12 × 768, 50,257-token BPE, tied embedding)", ""]
        lines += section(small_res, "GPT-2 small", full=False)
    lines += explain(main_res, default_res, small_res)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.write).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
