"""One generic batched exact-patching engine; every named patching sweep is built from it.

Activation patching (ROME; Vig et al.; TransformerLens ``patching.py``) runs a *base* input
(the corrupted or counterfactual prompt) and puts back, at one *site*, the activation the same
site had on a *source* run, then reads a metric at the last token. TransformerLens runs one
forward pass per site. Here:

- **Many variants per forward.** A variant (one site, or a window of sites) is applied to every
  base row it touches; the (variant, row) pairs are stacked in the batch dimension and chunked to
  a token budget.
- **Nothing recomputed that cannot change.** The base run is cached once. A variant whose first
  patch is in block ``l`` starts from the cached base residual entering block ``l`` and runs
  only blocks ``l..L-1`` (the bridge's own blocks, called with the arguments the base run gave
  them, so every hook still fires). Positions before a row's first patched position cannot
  change (causal attention): they are not recomputed, their keys and values come from the base
  run's KV cache. The final norm and unembedding run only at each row's last real token, the
  only position the metric reads. A row a variant does not touch (its role is
  absent, or the position is padding) is not run: its value is the base value.
- **No-op patches skipped.** Where a source's activation equals the base run's own at every
  position a patch sets (a prefix shared by the clean and corrupted prompts, a position the noise
  did not touch), the patch changes nothing: a (variant, row) whose every patch is such a no-op
  gets the base value without a forward. The test is bitwise equality, so this is exact.
- **Only the columns the metric reads.** A metric that declares ``columns`` (a log-ratio of
  single tokens, unchanged by a shift of all logits) gets logits unembedded at those columns only
  and ``-inf`` elsewhere.
- **Right-padded prompts of different lengths.** Masks are per row and position, so each
  prompt is patched at its own role positions and read at its own last token.

Both shortcuts are checked once per engine against the full forward (re-entry at block 0, and
with one cached position); an architecture where either fails falls back (to full prefixes, or
to full bridge forwards, still batched).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from biaslens.hooks import act_name, canonical

if TYPE_CHECKING:
    from biaslens.model import BiasModel
    from biaslens.prompts import TokenBatch

COMPONENTS = ("resid", "mlp", "attn")
# component -> hook component patched by the layer-level sweeps
LAYER_HOOKS = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass(frozen=True)
class Patch:
    """Set ``hook`` (in block ``layer``) to the ``source`` run's value where ``positions`` is True.

    ``positions``: ``[rows, pos]`` bool over base rows. ``unit`` selects one slice of the third
    axis (a head of ``hook_z`` ``[b, pos, head, d_head]``, a neuron of ``mlp.hook_post``).
    """

    hook: str
    layer: int
    positions: Bool[torch.Tensor, "rows pos"]
    source: str = "clean"
    unit: int | None = None


Variant = tuple[Patch, ...]


@dataclass
class ActSource:
    """Activations of a source run: ``acts[hook]`` is ``[src_rows, pos, ...]``, and base row ``r``
    reads source row ``rows[r]`` (e.g. the clean prompt of a noise sample)."""

    acts: dict[str, torch.Tensor]
    rows: Int[torch.Tensor, "rows"]


@dataclass
class Base:
    """The base rows every variant is applied to: right-padded ids, each row's prompt index,
    and an optional perturbation added to the token embeddings (``hook_embed``)."""

    input_ids: Int[torch.Tensor, "rows pos"]
    attention_mask: Int[torch.Tensor, "rows pos"]
    lengths: Int[torch.Tensor, "rows"]
    prompt_idx: Int[torch.Tensor, "rows"]
    embed_delta: Float[torch.Tensor, "rows pos d_model"] | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def from_batch(cls, batch: "TokenBatch", repeats: int = 1, embed_delta=None) -> "Base":
        """Each prompt ``repeats`` times in a row (row ``p * repeats + s``)."""
        idx = torch.arange(len(batch), device=batch.input_ids.device).repeat_interleave(repeats)
        return cls(batch.input_ids[idx], batch.attention_mask[idx], batch.lengths[idx], idx, embed_delta)


def metric_rows(metric: Callable, logits: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
    """Apply ``metric`` to last-token logits of rows belonging to ``prompt_idx`` (per-prompt
    targets via ``LogitMetric.subset``; a plain callable must not depend on the prompt)."""
    sub = getattr(metric, "subset", None)
    out = (sub(prompt_idx) if sub else metric)(logits)
    return torch.as_tensor(out, device=logits.device).float().reshape(-1)


def _take(obj: Any, idx: torch.Tensor, n_rows: int) -> Any:
    """Index the batch axis of every tensor in a block's call arguments; drop KV caches."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim >= 2 and obj.shape[0] == n_rows else obj
    if isinstance(obj, tuple):
        return tuple(_take(o, idx, n_rows) for o in obj)
    if isinstance(obj, list):
        return [_take(o, idx, n_rows) for o in obj]
    if isinstance(obj, dict):
        return {k: _take(v, idx, n_rows) for k, v in obj.items()}
    if type(obj).__name__.endswith("Cache"):  # a transformers KV cache: never reuse the base's
        return _CACHE_SLOT
    return obj


_CACHE_SLOT = object()  # where a block's KV cache argument goes


def _merge(args: list[Any], sizes: list[int]) -> Any:
    """Block call arguments of several row chunks as one: tensors whose batch axis has the
    chunk's size are concatenated, anything else (KV caches, shared tables) taken from the first."""
    first = args[0]
    if isinstance(first, torch.Tensor):
        if len(args) > 1 and first.ndim >= 2 and all(a.shape[0] == n for a, n in zip(args, sizes)):
            return torch.cat(args)
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([a[i] for a in args], sizes) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _merge([a[k] for a in args], sizes) for k in first}
    return first


def _find_cache(obj: Any) -> Any:
    """The transformers KV cache among a block's call arguments (filled by the base run)."""
    if type(obj).__name__.endswith("Cache"):
        return obj
    if isinstance(obj, (tuple, list)):
        obj = list(obj)
    elif isinstance(obj, dict):
        obj = list(obj.values())
    else:
        return None
    for o in obj:
        found = _find_cache(o)
        if found is not None:
            return found
    return None


def _cache_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each layer's ``(keys, values)`` ``[rows, kv_heads, pos, d_head]`` in a transformers
    ``DynamicCache`` (read by its public iteration, the layout ``ddp_cache_data`` takes), None
    for a layer left empty; ``[]`` for no cache, or one that cannot be read so."""
    try:
        layers = [tuple(t[:2]) for t in cache] if cache is not None else []
    except TypeError:  # not iterable (a static or offloaded cache)
        return []
    return [(k, v) if isinstance(k, torch.Tensor) and k.ndim == 4 and k.shape[-2] else None
            for k, v in layers]


@contextmanager
def _cache_as_past_key_values(bridge: Any, layers: Iterable[int]):
    """While active, the attention of each block in ``layers`` gets the KV cache it is handed as
    ``cache`` also as ``past_key_values``. Transformers ≥ 5.24 names it ``cache``; the bridge's
    attentions that recompute attention themselves read only ``past_key_values`` (or
    ``layer_past``), so they neither fill nor read it. Relies on that name; used only for blocks
    seen to leave their cache empty without it."""

    def alias(mod, args, kwargs):
        if "cache" in kwargs and "past_key_values" not in kwargs:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    handles = [bridge.blocks[l].attn.register_forward_pre_hook(alias, with_kwargs=True) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _skip(obj: Any, skip: int, width: int, kv: Any) -> Any:
    """Block arguments for positions ``skip:`` only: slice the query axis of masks and the
    position axis of position ids / rotary tables; put ``kv`` (the prefix's KV cache, or None)
    in the cache slot."""
    if obj is _CACHE_SLOT:
        return kv
    if not skip:
        if isinstance(obj, (tuple, list)):
            return type(obj)(_skip(o, 0, width, kv) for o in obj)
        return {k: _skip(v, 0, width, kv) for k, v in obj.items()} if isinstance(obj, dict) else obj
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 4 and obj.shape[-2:] == (width, width):
            return obj[:, :, skip:, :]
        if obj.ndim == 1 and obj.shape[0] == width:
            return obj[skip:]
        if obj.ndim >= 2 and obj.shape[1] == width:
            return obj[:, skip:]
        return obj
    if isinstance(obj, tuple):
        return tuple(_skip(o, skip, width, kv) for o in obj)
    if isinstance(obj, list):
        return [_skip(o, skip, width, kv) for o in obj]
    if isinstance(obj, dict):
        out = {k: _skip(v, skip, width, kv) for k, v in obj.items()}
        if "use_cache" in out:
            out["use_cache"] = True
        return out
    return obj


def _setter(act: torch.Tensor, hook: Any, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Hook: ``act = where(mask, src, act)`` for each ``(mask, src)`` (mask broadcast on the right)."""
    for mask, src in parts:
        while mask.ndim < act.ndim:
            mask = mask.unsqueeze(-1)
        act = torch.where(mask, src.to(act.dtype), act)
    return act


def _keep(act: torch.Tensor, hook: Any, cache: dict, name: str) -> torch.Tensor:
    """Hook: store ``act`` under the name it was requested by (aliases resolve to other names)."""
    cache[name] = act.detach()
    return act


def _add(act: torch.Tensor, hook: Any, delta: torch.Tensor) -> torch.Tensor:
    return act + delta.to(act.dtype)


class PatchEngine:
    """Exact activation patching of many variants over one base run (see module docstring).

    ``sources``: name → :class:`ActSource`; the base run's own activations of ``cache_hooks`` are
    added as source ``"base"`` (used to *freeze* a path, e.g. ROME's severed MLP).
    """

    def __init__(
        self,
        model: "BiasModel",
        base: Base,
        sources: dict[str, ActSource],
        metric: Callable,
        cache_hooks: Iterable[str] = (),
        early_start: bool = True,
        skip_noops: bool = True,
        reentry_check: tuple[int, int] | None = None,
        max_tokens: int = 8192,
        merge_tokens: int | None = None,
        progress: bool = True,
    ):
        self.model, self.base, self.metric = model, base, metric
        self.sources = dict(sources)
        self.max_tokens, self.progress = max_tokens, progress
        # recomputing a few unchanged positions is cheaper than another chunk (a bridge call per
        # block): merge while the extra positions stay under ~2^24 / d_model^2 (28 for d = 768)
        self.merge_tokens = (max(8, 2**24 // model.d_model**2) if merge_tokens is None
                             else merge_tokens)
        self.n_layers = model.n_layers
        # work done by run(): chunks, block-token passes (rows × positions × blocks), unembedded rows
        self.stats = {"chunks": 0, "block_tokens": 0, "unembed_rows": 0, "noop_rows": 0}
        self.skip_noops = skip_noops
        self._eq: dict[tuple[str, str], torch.Tensor] = {}
        # base activations of every hook a source can patch (to recognise no-op patches)
        patchable = set().union(*(s.acts for s in self.sources.values())) if skip_noops else set()
        self._run_base(set(cache_hooks), patchable, early_start, reentry_check)

    # ------------------------------------------------------------ base run
    def _embed_hook(self, rows: torch.Tensor | None = None):
        d = self.base.embed_delta
        if d is None:
            return []
        return [(act_name("embed"), partial(_add, delta=d if rows is None else d[rows]))]

    def _run_base(self, cache_hooks: set[str], patchable: set[str], early_start: bool,
                  reentry_check: tuple[int, int] | None = None) -> None:
        """Run the base rows once (in row chunks that bound the ``[rows, pos, vocab]`` logits),
        keeping the residual entering every block, ``cache_hooks``, each block's call arguments
        and its keys and values (from the KV cache), all merged over chunks. Re-entry is checked
        at block 0 with 0 and 1 cached positions, or only at ``reentry_check = (block, cached
        positions)`` when the caller will only ever re-enter there (a cheaper check)."""
        b = self.base
        width, vocab = int(b.input_ids.shape[1]), int(self.model.bridge.cfg.d_vocab)
        step = max(1, min(self.max_tokens // max(1, width), 2**26 // max(1, width * vocab)))
        chunks = [torch.arange(s, min(len(b), s + step), device=b.input_ids.device)
                  for s in range(0, len(b), step)]
        names = cache_hooks | patchable
        self._alias: list[int] = []  # blocks whose attention takes the cache as past_key_values
        first = self._run_base_rows(chunks[0], names)
        empty = [l for l, kv in enumerate(_cache_kv(_find_cache(first[2].get(0)))) if kv is None]
        if empty:  # their attention ignored the cache under the name the block passed it: again
            del first
            self._alias = empty
            first = self._run_base_rows(chunks[0], names)
            if any(kv is None for kv in _cache_kv(_find_cache(first[2].get(0)))):
                self._alias = []
        parts = [first] + [self._run_base_rows(r, names) for r in chunks[1:]]
        cache = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        last = torch.cat([p[1] for p in parts])
        captured = {l: _merge([p[2][l] for p in parts], [p[3] for p in parts])
                    for l in parts[0][2] if all(l in p[2] for p in parts)}
        kvs = [_cache_kv(_find_cache(p[2].get(0))) for p in parts]
        self._kv = None  # per block: the base rows' (keys, values)
        if all(len(kv) == self.n_layers and all(t is not None for t in kv) for kv in kvs):
            self._kv = kvs[0] if len(kvs) == 1 else [
                (torch.cat([kv[l][0] for kv in kvs]), torch.cat([kv[l][1] for kv in kvs]))
                for l in range(self.n_layers)]
        rows = torch.arange(len(b), device=last.device)
        self.base_logits = last
        self.base_metric = metric_rows(self.metric, last, b.prompt_idx)
        self.base_cache = cache
        self._block_args = captured
        self.sources["base"] = ActSource({k: v for k, v in cache.items() if k in cache_hooks}, rows)
        self._cols = self._column_head()
        start, skip = reentry_check or (0, 0)
        able = early_start and len(captured) == self.n_layers and (self._kv is not None or skip == 0)
        ok = able and self._check_reentry(skip, start)
        if able and not ok and self._cols is not None:  # retry with every logit column
            self._cols = None
            ok = self._check_reentry(skip, start)
        self.early_start = ok
        # skipping an unchanged prefix needs the base run's KV cache, checked like re-entry
        # (already, when the caller named the only place it will re-enter)
        self.skip_prefix = ok if reentry_check else (
            ok and self._kv is not None and self._check_reentry(1))

    def _run_base_rows(self, rows: torch.Tensor, cache_hooks: set[str]):
        """One base forward over ``rows``: (cache, last-token logits, block arguments, n rows)."""
        b, bridge = self.base, self.model.bridge
        names = {act_name("resid_pre", l) for l in range(self.n_layers)} | cache_hooks
        captured: dict[int, tuple] = {}
        handles = []
        for l, block in enumerate(bridge.blocks):
            def pre(mod, args, kwargs, l=l):
                captured[l] = (args[1:], kwargs)
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        cache: dict[str, torch.Tensor] = {}
        hooks = self._embed_hook(rows) + [(n, partial(_keep, cache=cache, name=n)) for n in names]
        width = int(b.input_ids.shape[1])
        # rows without padding: their last token is the last position, the only one to unembed
        kw = {"logits_to_keep": 1} if bool((b.lengths[rows] == width).all()) else {}
        try:
            with (torch.no_grad(), bridge.hooks(fwd_hooks=hooks),
                  _cache_as_past_key_values(bridge, self._alias)):
                logits = bridge(b.input_ids[rows], attention_mask=b.attention_mask[rows], **kw)
        finally:
            for h in handles:
                h.remove()
        pos = b.lengths[rows] - 1 - (width - logits.shape[1])
        last = logits[torch.arange(len(rows), device=logits.device), pos]
        return cache, last, captured, len(rows)

    def _check_reentry(self, skip: int, start: int = 0) -> bool:
        """Re-entering at block ``start`` (after ``skip`` cached positions) must reproduce the
        full forward's last-token logits."""
        rows = (self.base.lengths > skip).nonzero().squeeze(1)
        if not len(rows):
            return skip == 0
        try:
            with torch.no_grad():
                again = self._forward_from(start, rows, [], skip)
        except Exception:  # an architecture whose blocks cannot be called on their own
            return False
        ref = self.base_logits[rows]
        if self._cols is not None:
            again, ref = again[:, self._cols[0]], ref[:, self._cols[0]]
        scale = float(ref.abs().max()) + 1.0
        return bool((again - ref).abs().max() <= 1e-4 * scale)

    def _column_head(self):
        """``(columns, output embedding)`` when the metric declares the columns it reads and the
        output embedding is a plain linear map, else None."""
        cols = getattr(self.metric, "columns", None)
        head = self.model.hf.get_output_embeddings() if cols is not None else None
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            return None
        return cols.to(head.weight.device), head

    def _unembed(self, resid: torch.Tensor, full: bool = False) -> torch.Tensor:
        """Logits of final residuals: full, or only the metric's columns (``-inf`` elsewhere)."""
        bridge = self.model.bridge
        if self._cols is None or full:
            return bridge.unembed(bridge.ln_final(resid))
        cols, head = self._cols
        h = bridge.ln_final(resid)
        bias = getattr(head, "bias", None)
        out = torch.full((h.shape[0], int(bridge.cfg.d_vocab)), float("-inf"), dtype=h.dtype, device=h.device)
        out[:, cols] = torch.nn.functional.linear(  # sliced per call: the weights may change
            h, head.weight[cols].to(h.dtype), None if bias is None else bias[cols].to(h.dtype))
        return out

    # ------------------------------------------------------------- forwards
    def _forward_from(self, start: int, rows: torch.Tensor, hooks: list, skip: int = 0,
                      full: bool = False) -> torch.Tensor:
        """Last-token logits of base ``rows`` run from block ``start`` with ``hooks``; the first
        ``skip`` positions (unchanged by the hooks) come from the base run's KV cache. ``full``:
        every vocabulary column even when the metric declares fewer. Differentiable (no
        ``no_grad`` here): gradients reach tensors the hooks add."""
        bridge, n = self.model.bridge, len(self.base)
        x = self.base_cache[act_name("resid_pre", start)][rows, skip:]
        kv = None
        if skip:  # a fresh cache holding the prefix of these rows
            from transformers import DynamicCache

            kv = DynamicCache()
            for l, (keys, values) in enumerate(self._kv):
                kv.update(keys[rows, :, :skip], values[rows, :, :skip], l)
        width = int(self.base.input_ids.shape[1])
        with bridge.hooks(fwd_hooks=hooks), _cache_as_past_key_values(bridge, self._alias):
            for l in range(start, self.n_layers):
                args, kwargs = self._block_args[l]
                args, kwargs = _take(args, rows, n), _take(kwargs, rows, n)
                args, kwargs = _skip(args, skip, width, kv), _skip(kwargs, skip, width, kv)
                out = bridge.blocks[l](x, *args, **kwargs)
                x = out[0] if isinstance(out, tuple) else out
            last = x[torch.arange(len(rows), device=x.device), self.base.lengths[rows] - 1 - skip]
            return self._unembed(last, full)

    def forward_from(self, start: int, hooks: Sequence = (), skip: int = 0,
                     rows: torch.Tensor | None = None, full: bool = False) -> torch.Tensor:
        """Last-token logits of the base ``rows`` (default all) re-run from block ``start`` with
        ``hooks``, recomputing only positions ``skip:`` (the hooks must leave earlier positions
        unchanged); differentiable in whatever the hooks add. Needs a passed re-entry check."""
        if not self.early_start or (skip and not self.skip_prefix):
            raise RuntimeError("this engine cannot re-enter blocks (its re-entry check failed)")
        rows = torch.arange(len(self.base), device=self.base.input_ids.device) if rows is None else rows
        return self._forward_from(start, rows, list(hooks), skip, full)

    def _forward_full(self, rows: torch.Tensor, hooks: list) -> torch.Tensor:
        b, bridge = self.base, self.model.bridge
        with bridge.hooks(fwd_hooks=self._embed_hook(rows) + hooks):
            logits = bridge(b.input_ids[rows], attention_mask=b.attention_mask[rows])
        return logits[torch.arange(len(rows), device=logits.device), b.lengths[rows] - 1]

    # ------------------------------------------------------------ variants
    def run(self, variants: Sequence[Variant], desc: str = "patching") -> Float[torch.Tensor, "variant rows"]:
        """The metric for every (variant, base row); rows a variant does not touch get the base
        value. Returns ``[n_variants, n_rows]``."""
        out = self.base_metric.unsqueeze(0).repeat(len(variants), 1)
        groups: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        width = int(self.base.input_ids.shape[1])
        for v, var in enumerate(variants):
            if not var:
                continue
            first = torch.full((len(self.base),), width, dtype=torch.long, device=out.device)
            for p in var:  # first patched position of each row (width: untouched)
                pos = torch.where(p.positions.any(1), p.positions.int().argmax(1), width)
                first = torch.minimum(first, pos)
            if self.skip_noops:
                live = torch.zeros(len(self.base), dtype=torch.bool, device=out.device)
                for p in var:
                    live |= ~self._noop(p)
                self.stats["noop_rows"] += int((~live & (first < width)).sum())
                first = torch.where(live, first, width)
            start = min(p.layer for p in var) if self.early_start else 0
            for skip in first[first < width].unique().tolist():
                rows = (first == skip).nonzero().squeeze(1)
                groups.setdefault(start, []).append((skip if self.skip_prefix else 0, v, rows))
        chunks = list(self._chunks(groups))
        bar = tqdm(chunks, desc=desc, disable=not self.progress or len(chunks) < 4, leave=False)
        with torch.no_grad():
            for start, skip, items in bar:
                v_idx, rows, values = self._run_chunk(start, skip, items, variants)
                out[v_idx, rows] = values
        return out

    def _chunks(self, groups: dict[int, list[tuple[int, int, torch.Tensor]]]):
        """``(start, skip, items)`` chunks of at most ``max_tokens`` tokens. Within a start layer
        the (variant, rows) items are sorted by how many leading positions they leave unchanged;
        a chunk skips the smallest of them, and a new chunk starts once the positions recomputed
        needlessly by the rows merged into it would exceed ``merge_tokens``."""
        width = int(self.base.input_ids.shape[1])
        for start in sorted(groups):
            items = sorted(groups[start], key=lambda t: t[0])
            chunk: list[tuple[int, torch.Tensor]] = []
            n, skip, waste = 0, items[0][0], 0
            for s, v, rows in items:
                if chunk and s > skip:
                    waste += len(rows) * (s - skip)
                    if waste > self.merge_tokens:
                        yield start, skip, chunk
                        chunk, n, skip, waste = [], 0, s, 0
                while len(rows):
                    budget = max(1, self.max_tokens // max(1, width - skip))
                    take = rows[: max(0, budget - n)] if n < budget else rows[:0]
                    if len(take):
                        chunk.append((v, take))
                        n += len(take)
                        rows = rows[len(take):]
                    if n >= budget:
                        yield start, skip, chunk
                        chunk, n, skip, waste = [], 0, s, 0
            if chunk:
                yield start, skip, chunk

    def _run_chunk(self, start: int, skip: int, items: list[tuple[int, torch.Tensor]],
                   variants: Sequence[Variant]):
        rows = torch.cat([r for _, r in items])
        v_idx = torch.cat([torch.full_like(r, v) for v, r in items])
        n, width = len(rows), self.base.input_ids.shape[1]
        # one mask per (hook, source): [n, pos], or [n, pos, unit] when a patch picks units
        unit_keys = {(p.hook, p.source) for v, _ in items for p in variants[v] if p.unit is not None}
        masks: dict[tuple[str, str], torch.Tensor] = {}
        offset = 0
        for v, r in items:
            for p in variants[v]:
                key = (p.hook, p.source)
                if key not in masks:
                    units = (self._n_units(p.source, p.hook),) if key in unit_keys else ()
                    masks[key] = torch.zeros((n, width) + units, dtype=torch.bool, device=rows.device)
                m = masks[key]
                sel = p.positions[r]
                if m.ndim == 2:
                    m[offset: offset + len(r)] |= sel
                elif p.unit is None:
                    m[offset: offset + len(r)] |= sel[..., None]
                else:
                    m[offset: offset + len(r), :, p.unit] |= sel
            offset += len(r)
        parts: dict[str, list] = {}
        for (hook, source), mask in masks.items():
            src = self._source(source, hook, rows)
            parts.setdefault(hook, []).append((mask[:, skip:], src[:, skip:]))
        hooks = [(hook, partial(_setter, parts=ps)) for hook, ps in parts.items()]
        if self.early_start:
            logits = self._forward_from(start, rows, hooks, skip)
        else:
            logits = self._forward_full(rows, hooks)
        self.stats["chunks"] += 1
        self.stats["block_tokens"] += n * (width - skip) * (self.n_layers - start)
        self.stats["unembed_rows"] += n if self.early_start else n * width
        return v_idx, rows, metric_rows(self.metric, logits, self.base.prompt_idx[rows])

    def _noop(self, p: Patch) -> torch.Tensor:
        """``[rows]``: True where patch ``p`` sets only values equal to the base run's own."""
        key = (p.source, p.hook)
        if key not in self._eq:  # [rows, pos], or [rows, pos, unit] where the hook has units
            base = self.base_cache.get(p.hook)
            src = None if base is None else self._source(
                p.source, p.hook, torch.arange(len(self.base), device=base.device))
            if src is None or src.shape != base.shape:  # nothing to compare: never a no-op
                eq = torch.zeros(self.base.input_ids.shape, dtype=torch.bool)
            else:
                eq = src == base
                while eq.ndim > 3:  # [rows, pos, head, d_head] -> per head
                    eq = eq.all(-1)
            self._eq[key] = eq.to(p.positions.device)
        eq = self._eq[key]
        if eq.ndim == 3:
            eq = eq.all(-1) if p.unit is None else eq[:, :, p.unit]
        return (~p.positions | eq).all(1)

    def _n_units(self, name: str, hook: str) -> int:
        return int(self._source(name, hook, self.base.prompt_idx[:1]).shape[2])

    def _source(self, name: str, hook: str, rows: torch.Tensor) -> torch.Tensor:
        if name not in self.sources:
            raise KeyError(f"no source run named {name!r} (have: {', '.join(self.sources)})")
        s = self.sources[name]
        if hook not in s.acts:
            raise KeyError(f"source {name!r} did not cache {hook!r}")
        return s.acts[hook][s.rows[rows]]


# ---------------------------------------------------------------- variant builders
def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The ``window`` consecutive layers centred on ``layer``, clipped to the model (ROME §2.1)."""
    lo = max(0, min(layer - window // 2, n_layers - window))
    return list(range(lo, min(n_layers, lo + window)))


def role_masks(batch: "TokenBatch", base: Base, roles: Sequence[str]) -> dict[str, torch.Tensor]:
    """``[rows, pos]`` masks of each role over the base rows (a role's positions all at once)."""
    return {r: batch.role_mask(r)[base.prompt_idx] for r in roles}


def position_masks(base: Base) -> list[torch.Tensor]:
    """One ``[rows, pos]`` mask per absolute position (rows shorter than the position untouched)."""
    width = base.input_ids.shape[1]
    real = base.attention_mask.bool()
    out = []
    for i in range(width):
        m = torch.zeros_like(real)
        m[:, i] = real[:, i]
        out.append(m)
    return out


def layer_variants(
    component: str, layers: Sequence[int], masks: Sequence[torch.Tensor], n_layers: int,
    window: int = 1, source: str = "clean",
) -> list[Variant]:
    """Variants ``[layer][index]`` (flattened) patching ``component`` at each layer × mask;
    a window > 1 patches the ``window`` layers around each layer together."""
    hook_comp = LAYER_HOOKS.get(component, canonical(component))
    out = []
    for l in layers:
        ls = [l] if window <= 1 else window_layers(l, window, n_layers)
        for m in masks:
            out.append(tuple(Patch(act_name(hook_comp, j), j, m, source) for j in ls))
    return out


def generic_patch_sweep(
    engine: PatchEngine, masks: Sequence[torch.Tensor], component: str,
    layers: Sequence[int] | None = None, window: int = 1, source: str = "clean",
) -> Float[torch.Tensor, "layer index rows"]:
    """Patch ``component`` at every layer × mask; the metric per ``[layer, mask, base row]``."""
    layers = list(range(engine.n_layers)) if layers is None else list(layers)
    variants = layer_variants(component, layers, masks, engine.n_layers, window, source)
    vals = engine.run(variants, desc=f"patch {component}")
    return vals.reshape(len(layers), len(masks), -1)


def _by_pos(engine: PatchEngine, component: str, **kw) -> torch.Tensor:
    return generic_patch_sweep(engine, position_masks(engine.base), component, **kw)


# TransformerLens-style named sweeps over absolute positions: [layer, pos, rows].
patch_resid_pre_by_pos = partial(_by_pos, component="resid")
patch_mlp_out_by_pos = partial(_by_pos, component="mlp")
patch_attn_out_by_pos = partial(_by_pos, component="attn")


def clean_source(model: "BiasModel", batch: "TokenBatch", hooks: Iterable[str], rows: torch.Tensor,
                 fwd_hooks: Sequence = ()) -> tuple[ActSource, torch.Tensor]:
    """Cache ``hooks`` on ``batch`` (one forward) as a source; also return last-token logits."""
    cache: dict[str, torch.Tensor] = {}
    keep = [(h, partial(_keep, cache=cache, name=h)) for h in set(hooks)]
    with torch.no_grad():
        logits = model.forward(batch, list(fwd_hooks) + keep)
    last = logits[torch.arange(len(batch), device=logits.device), batch.lengths - 1]
    return ActSource(cache, rows), last
