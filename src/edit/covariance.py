"""Second moment of MLP keys over general text, C = E[k kᵀ] (MEMIT's ``mom2``), cached on disk.

MEMIT estimates C per layer from ~100k Wikipedia tokens and reuses it across edits. Here any text
file works (one document per line); the statistic is cached as safetensors under
``$BIASLENS_CACHE`` (default ``~/.cache/biaslens/cov``), keyed by the model's weight hash, the
layer, the corpus file's hash and the sampling settings, so an edited model or another corpus
never reuses a stale matrix. All requested layers come from one forward pass that stops after the
deepest of them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from biaslens.edit.solve import regularised_factor
from biaslens.errors import BiasLensError, DataFormatError
from biaslens.prompts import pad_rows
from biaslens.hooks import act_name

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

    from biaslens.model import BiasModel

__all__ = ["CACHE_ENV", "cache_root", "file_hash", "corpus_windows", "length_sorted_batches",
           "accumulate_second_moments", "key_covariances", "save_cached", "load_cached",
           "cached_factors", "key_covariance"]

CACHE_ENV = "BIASLENS_CACHE"
_FORMAT = 1  # bump when the statistic's definition changes


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The covariance cache folder: ``cache_dir``, else ``$BIASLENS_CACHE``, else
    ``~/.cache/biaslens/cov``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "biaslens" / "cov"


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_path(root: Path, model_hash: str, corpus_hash: str, layer: int, n_tokens: int,
                seq_len: int) -> Path:
    return root / f"{model_hash[:20]}-{corpus_hash[:16]}-L{layer}-n{n_tokens}-s{seq_len}-v{_FORMAT}.safetensors"


def corpus_windows(model: "BiasModel", path: str | os.PathLike, n_tokens: int,
                   seq_len: int) -> list[list[int]]:
    """Token windows of at most ``seq_len`` tokens (and at most the model's maximum positions)
    covering the first ``n_tokens`` tokens of the file: each line is a document (BOS first when
    the model uses one); long documents are cut into windows."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"corpus '{path}' does not exist or is not a file; pass a text file "
                              "with one document per line (e.g. WikiText-2's wiki.train.raw)")
    bos = [model.tokenizer.bos_token_id] if model.prepend_bos else []
    seq_len = min(seq_len, model.max_positions or seq_len)  # windows fit the model's context
    step = seq_len - len(bos)
    windows, total = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            body = model.tokenize([line], length="any")[0][len(bos):]
            for s in range(0, len(body), step):
                w = bos + body[s : s + step]
                take = min(len(w), n_tokens - total)
                if take < 2:
                    break
                windows.append(w[:take])
                total += take
            if total >= n_tokens - 1:
                break
    if not windows:
        raise DataFormatError(f"corpus '{path}' holds no text to estimate key statistics from")
    return windows


def length_sorted_batches(windows: Sequence[list[int]], batch_size: int, pad: int) -> Iterator[tuple]:
    """``(ids, mask)`` batches of ``windows`` in order of length (so there is little padding),
    padded with ``pad``."""
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))  # little padding
    for s in range(0, len(order), batch_size):
        yield pad_rows([windows[i] for i in order[s : s + batch_size]], pad)


def accumulate_second_moments(
    model: "BiasModel", layers: Iterable[int], windows: Sequence[list[int]], batch_size: int = 32,
    progress: bool = True, estimate_after: float = 5.0,
) -> dict[int, "Float[torch.Tensor, 'd_mlp d_mlp']"]:
    """E[k kᵀ] (float64) of the MLP keys at ``layers`` over the real tokens of ``windows``.

    Each batch's Kᵀ K is formed in the model's dtype and summed in float64. The forward stops after
    the deepest layer. Prints a time estimate to stderr when the run looks longer than
    ``estimate_after`` seconds.
    """
    import torch
    from tqdm.auto import tqdm

    layers = sorted(set(int(l) for l in layers))
    names = {act_name("mlp_key", l): l for l in layers}
    d = model.d_mlp
    sums = {l: torch.zeros((d, d), dtype=torch.float64, device=model.device) for l in layers}
    total = sum(len(w) for w in windows)
    count = 0
    state: dict = {}

    def grab(act, hook, layer):  # hook.name may be the bridge's own name, not the alias
        k = act[state["mask"]]  # [n_real_tokens, d_mlp]
        sums[layer] += (k.T @ k).to(torch.float64)
        return act

    pad = model.tokenizer.pad_token_id
    bar = tqdm(total=total, unit="tok", desc=f"key statistics L{layers}", disable=not progress,
               file=sys.stderr, leave=False)
    t0, announced = time.perf_counter(), False
    with torch.no_grad():
        for ids, mask in length_sorted_batches(windows, batch_size, pad):
            ids, mask = ids.to(model.device), mask.to(model.device)
            state["mask"] = mask.bool()
            model.bridge.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(n, partial(grab, layer=l)) for n, l in names.items()],
                                        stop_at_layer=max(layers) + 1,
                                        logits_to_keep=1)  # no full unembedding at the last layer
            n = int(mask.sum())
            count += n
            bar.update(n)
            if not announced and progress:
                announced = True
                est = (time.perf_counter() - t0) / n * (total - n)
                if est > estimate_after:
                    print(f"biaslens: estimating key statistics over {total:,} tokens at layers "
                          f"{layers}: about {est:.0f} s (cached afterwards)", file=sys.stderr)
    bar.close()
    return {l: s / count for l, s in sums.items()}


def key_covariances(
    model: "BiasModel", layers: Iterable[int], corpus_path: str | os.PathLike,
    n_tokens: int = 50_000, seq_len: int = 128, batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None, use_cache: bool = True, progress: bool = True,
    paths_out: dict | None = None,
) -> dict[int, "Float[torch.Tensor, 'd_mlp d_mlp']"]:
    """C_l = E[k kᵀ] for each layer (float64, uncentred as in MEMIT), from the cache or one pass.
    ``paths_out`` (optional) receives each layer's cache file (when caching is on)."""
    import torch
    import torch

    layers = sorted(set(int(l) for l in layers))
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad:
        raise BiasLensError(f"layer(s) {bad} out of range: {model.spec} has layers 0..{model.n_layers - 1}")
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise DataFormatError(f"corpus '{corpus_path}' does not exist or is not a file; pass a text "
                              "file with one document per line")
    seq_len = min(seq_len, model.max_positions or seq_len)  # as corpus_windows cuts them
    root = cache_root(cache_dir)
    mhash, chash = model.weight_hash(), file_hash(corpus_path)
    paths = {l: _cache_path(root, mhash, chash, l, n_tokens, seq_len) for l in layers}
    if paths_out is not None and use_cache:
        paths_out.update(paths)
    out: dict[int, torch.Tensor] = {}
    if use_cache:
        for l, p in paths.items():
            c = load_cached(p, "second_moment", (model.d_mlp, model.d_mlp), torch.float64)
            if c is not None:
                out[l] = c.to(model.device)
    missing = [l for l in layers if l not in out]
    if missing:
        windows = corpus_windows(model, corpus_path, n_tokens, seq_len)
        got = sum(len(w) for w in windows)
        if got < model.d_mlp:
            import warnings

            warnings.warn(f"key statistics from {got} tokens, fewer than the MLP width "
                          f"{model.d_mlp}: C is singular and the preservation term weak; use a "
                          "larger corpus or more tokens (cov_tokens)", stacklevel=2)
        fresh = accumulate_second_moments(model, missing, windows, batch_size, progress)
        n_used = sum(len(w) for w in windows)
        for l, c in fresh.items():
            out[l] = c
            if use_cache:
                save_cached(paths[l], "second_moment", c, {
                    "model": model.spec, "weight_sha256": mhash, "corpus": corpus_path.name,
                    "corpus_sha256": chash, "layer": str(l), "n_tokens": str(n_used),
                    "seq_len": str(seq_len)})
    return {l: out[l] for l in layers}


def _tensor_sha256(t: "torch.Tensor") -> str:
    """sha256 of a CPU tensor's bytes (no copy for a contiguous tensor)."""
    import torch

    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).reshape(-1).numpy()).hexdigest()


def save_cached(path: Path, key: str, tensor: "torch.Tensor", metadata: dict[str, str]) -> None:
    """Write one cache entry atomically: a per-process temporary file, then ``os.replace``, so
    processes sharing a cache never see (or remove) each other's half-written files. The tensor's
    sha256 goes into the metadata."""
    from safetensors.torch import save_file

    from biaslens.io import atomic_path

    t = tensor.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({key: t}, str(tmp), metadata={**metadata, "sha256": _tensor_sha256(t)})


def load_cached(path: Path, key: str, shape: tuple[int, ...], dtype) -> "torch.Tensor | None":
    """A cache entry, or ``None`` when it is missing; an entry that cannot be read, has the wrong
    shape or dtype, holds NaN/inf or fails its checksum is reported in one line on stderr and
    treated as missing (recomputed and overwritten)."""
    import torch
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = f.get_tensor(key)
    except Exception as exc:  # truncated, garbled, unreadable, missing key
        why = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    else:
        why = None
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            why = f"a {tuple(t.shape)} {t.dtype} tensor where {tuple(shape)} {dtype} was expected"
        elif meta.get("sha256") and meta["sha256"] != _tensor_sha256(t):
            why = "its checksum does not match"
        elif not torch.isfinite(t).all():
            why = "it holds NaN or inf"
        if why is None:
            return t
    print(f"biaslens: warning: cache file '{path}' is {why}; recomputing it", file=sys.stderr)
    return None


def cached_factors(covs: dict[int, "torch.Tensor"], paths: dict[int, Path], mom2_weight: float,
                   ridge: float) -> dict[int, "torch.Tensor"]:
    """The Cholesky factor of λC + ridge·mean(diag λC)·I for each layer whose key statistic has a
    cache file, itself cached beside it (keyed by λ and ridge), so an edit with cached statistics
    does no d_mlp × d_mlp factorisation (:func:`biaslens.edit.solve.least_squares_update`)."""
    out = {}
    for l, cov_path in paths.items():
        f = cov_path.with_name(f"{cov_path.stem}.chol-{mom2_weight:g}-{ridge:g}.safetensors")
        got = load_cached(f, "factor", tuple(covs[l].shape), covs[l].dtype)
        if got is not None:
            out[l] = got.to(covs[l].device)
            continue
        out[l] = regularised_factor(covs[l], mom2_weight, ridge)
        save_cached(f, "factor", out[l], {"mom2_weight": repr(mom2_weight), "ridge": repr(ridge),
                                          "of": cov_path.name})
    return out


def key_covariance(
    model: "BiasModel", layer: int, corpus_path: str | os.PathLike, n_tokens: int = 50_000,
    seq_len: int = 128, batch_size: int = 32, cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True, progress: bool = True,
) -> "Float[torch.Tensor, 'd_mlp d_mlp']":
    """C = E[k kᵀ] of the MLP key (input to the output projection) at ``layer`` over the text file
    ``corpus_path`` (float64 ``[d_mlp, d_mlp]``); see :func:`key_covariances`."""
    return key_covariances(model, [layer], corpus_path, n_tokens, seq_len, batch_size, cache_dir,
                           use_cache, progress)[int(layer)]
