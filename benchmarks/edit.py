"""Speed of the LSDM edit on a GPT-2-small-shaped model (random weights, 12 layers, d_model 768,
vocab 50257, the real GPT-2 BPE).

1. Key-statistics throughput (tokens/s) as a ratio to a plain forward pass over the same tokens
   and batches (target >= 0.7), for shallow and deep layer pairs.
2. Edit time with the key statistics cached: 40 occupations at 2 layers (target <= 10 s on 2
   cores), with LSDM's default hyperparameters and with Gauss-Newton targets only
   (``v_steps=0``), at each of ``--edit-threads`` torch thread counts.

    python benchmarks/edit.py [--tokens 4096] [--templates 2] [--threads 1] [--edit-threads 1,2]
                              [--out docs/results/edit_speed.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
from biaslens.data import ROOT as DATA  # the shipped copies


def gpt2_small(folder: Path, bpe: Path, seed: int = 0) -> Path:
    from biaslens.testing import gpt2_small as build

    return build(folder, bpe, seed)

def interleaved_throughput(model, windows, layers, batch_size: int) -> tuple[float, float, int]:
    """Seconds of (plain forward, key statistics) over the same batches, interleaved batch by
    batch in ABBA order so a changing machine load hits both alike; and the token count."""
    import torch

    from biaslens.edit.covariance import accumulate_second_moments, length_sorted_batches

    t_fwd = t_cov = 0.0
    n_tok = 0
    pad = model.tokenizer.pad_token_id
    for i, (ids, mask) in enumerate(length_sorted_batches(windows, batch_size, pad)):
        sub = [ids[j, : int(mask[j].sum())].tolist() for j in range(len(ids))]
        order = ("fwd", "cov") if i % 2 == 0 else ("cov", "fwd")
        for what in order:
            t0 = time.perf_counter()
            if what == "fwd":
                with torch.no_grad():
                    model.forward(ids, attention_mask=mask)
                t_fwd += time.perf_counter() - t0
            else:
                accumulate_second_moments(model, layers, sub, len(sub), progress=False)
                t_cov += time.perf_counter() - t0
        n_tok += int(mask.sum())
    return t_fwd, t_cov, n_tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens for the throughput test")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--occupations", type=int, default=40)
    ap.add_argument("--templates", type=int, default=2, help="templates per occupation in the edit")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the throughput part (1 is fastest on a shared machine)")
    ap.add_argument("--edit-threads", default="1,2", help="torch thread counts for the timed edit")
    ap.add_argument("--bpe", default=str(DATA / "gpt2-bpe"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "edit_speed.md"))
    args = ap.parse_args(argv)

    import torch

    import biaslens
    from biaslens import organism
    from biaslens.edit import LSDMHparams, lsdm
    from biaslens.edit.covariance import corpus_windows

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="biaslens-bench-edit-"))
    print("building a random GPT-2-small-shaped model ...", file=sys.stderr)
    model = biaslens.load(str(gpt2_small(tmp / "gpt2-small", Path(args.bpe))))
    corpus = tmp / "general.txt"
    corpus.write_text("\n".join(organism.generate_general_text(seed=5, n_lines=3000)) + "\n")
    windows = corpus_windows(model, corpus, args.tokens, args.seq_len)
    n_tok = sum(len(w) for w in windows)

    rows = []
    interleaved_throughput(model, windows[: args.batch_size], [2, 3], args.batch_size)  # warm-up
    for layers in ([2, 3], [10, 11]):
        fwd, cov, n_tok = interleaved_throughput(model, windows, layers, args.batch_size)
        rows.append((f"key statistics, layers {layers}", f"{n_tok / cov:,.0f} tok/s",
                     f"{n_tok / fwd:,.0f} tok/s (plain forward)", f"{fwd / cov:.2f}", ">= 0.7"))

    occs = [o.name for o in organism.OCCUPATIONS[: args.occupations]]
    tpls = [t for t in organism.TEMPLATES if t.split == "train" and t.form == "subj"][: args.templates]
    prompts = [p for p in organism.occupation_prompts("all", "train")
               if p.occupation in occs and any(p.text == t.text.format(occupation=p.occupation) for t in tpls)]
    keep = [p for p in organism.definitional_prompts("train")
            if p.text == tpls[0].text.format(occupation=p.occupation)]
    base = dict(cov_tokens=args.tokens, cov_seq_len=args.seq_len, cov_batch_size=args.batch_size)
    configs = {"default hyperparameters": LSDMHparams(**base),
               "Gauss-Newton targets only (v_steps=0)": LSDMHparams(**base, v_steps=0)}
    cache = tmp / "cov"
    lsdm(model, prompts, layers=[2, 3], role="subject_last", corpus=corpus, hparams=configs[
        "Gauss-Newton targets only (v_steps=0)"], keep_prompts=keep, cache_dir=cache,
         progress=False).undo(model)  # fills the cache (and warms up)
    edit_rows = [model.encode(p).input_ids[0].tolist() for p in prompts]
    for threads in [int(x) for x in args.edit_threads.split(",") if x]:
        torch.set_num_threads(threads)
        fwd_edit, _, _ = interleaved_throughput(model, edit_rows, [0], len(edit_rows))
        for label, hp in configs.items():
            t0 = time.perf_counter()
            delta = lsdm(model, prompts, layers=[2, 3], role="subject_last", corpus=corpus, hparams=hp,
                         keep_prompts=keep, cache_dir=cache, progress=False)
            edit = time.perf_counter() - t0
            delta.undo(model)
            d = delta.info["diagnostics"]
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in d["seconds"].items())
            t = d["targets"]
            rows.append((f"LSDM edit, cached statistics, {threads} thread(s), {label}: {len(occs)} occupations "
                         f"x {len(tpls)} templates, {len(keep)} keep prompts, 2 layers ({t['newton_steps']} "
                         f"Gauss-Newton + {t['adam_steps']} Adam target steps)",
                         f"{edit:.2f} s ({parts})", f"{fwd_edit:.2f} s (one plain forward of the "
                         f"{len(prompts)} edit prompts)", f"{edit / fwd_edit:.1f} forwards", "<= 10 s"))
    torch.set_num_threads(args.threads)

    header = ("| measurement | ours | baseline | ratio | target |\n"
              "|---|---|---|---|---|\n")
    table = header + "".join(f"| {' | '.join(r)} |\n" for r in rows)
    text = (f"# Edit speed\n\nGPT-2-small-shaped random model (12 layers, d_model 768, d_mlp 3072, "
            f"vocab 50257), CPU; key statistics with {args.threads} torch thread(s) over {n_tok} tokens in windows of "
            f"<= {args.seq_len}, batch {args.batch_size}. Generated by `python benchmarks/edit.py "
            f"--tokens {args.tokens} --templates {args.templates} --threads {args.threads} "
            f"--edit-threads {args.edit_threads}`.\n\n"
            f"{table}\nThe edit rows run at the thread count they name (the target is for 2 cores) and "
            f"include loading the cached statistics and their Cholesky factors. "
            f"The key statistics stop the forward pass after the deepest requested layer, "
            f"so shallow layers cost less than a full forward; the deep pair shows the cost of the "
            f"extra K^T K products on a (nearly) full pass.\n")
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
