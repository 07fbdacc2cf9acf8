"""One generic batched exact-patching engine; every named patching sweep is built from it.

Activation patching (ROME; Vig et al.; TransformerLens ``patching.py``) runs a *base* input
(the corrupted or counterfactual prompt) and puts back, at one *site*, the activation the same
site had on a *source* run, then reads a metric at the last token. TransformerLens runs one
forward pass per site. Here (docs/methods/tracing.md):

- **Many variants per call.** A variant (one site, or a window of sites) is applied to every
  base row it touches; the (variant, row) pairs are stacked in the batch dimension. Rows are
  grouped by the first position a variant changes and by the row's length; each group computes
  exactly its positions ``first:length`` (no padding), and every group goes through a block in
  the same call (its positions stacked in one matrix per weight, attention per group), with
  rows joining at their first patched block: one call per block for a whole sweep, bounded by a
  token budget.
- **Nothing recomputed that cannot change.** The base run is cached once (sources given as
  :class:`SourceRun` ride in the same forward). A row enters at its first patched block from
  the cached base residual; positions before its first patched position cannot change (causal
  attention): their keys and values come from the base run's. In the final block only the last
  position is run whole: earlier positions give their keys and values alone. A patch of a
  block's MLP output sets the next block's input (``resid_mid + source``; the block output is
  that sum, checked bitwise on the base run), so that block is not run. Only each row's last
  token is unembedded. A row a variant does not touch (its role is absent, or the position is
  padding) is not run: its value is the base value.
- **No-op patches skipped.** Where a source's activation equals the base run's own at every
  position a patch sets (a prefix shared by the clean and corrupted prompts, a position the noise
  did not touch), the patch changes nothing: a (variant, row) whose every patch is such a no-op
  gets the base value without a forward. The test is bitwise equality, so this is exact.
- **Only the columns the metric reads.** A metric that declares ``columns`` (a log-ratio of
  single tokens, unchanged by a shift of all logits) gets logits unembedded at those columns only
  and ``-inf`` elsewhere.
- **Fused GPT-2 blocks.** For GPT-2-architecture models the blocks run as a few fused ops on the
  weights the bridge computes with (:class:`FusedGPT2`); patches are set at the residual,
  attention- and MLP-output sites there. Any other model, or a patch elsewhere, runs the
  bridge's own blocks (re-entered with the arguments the base run gave them, so every hook
  fires), in chunks merged where fewer calls save more than the positions they add.

Every shortcut is checked once per engine against the base run's logits (re-entry after a cached
prefix, the final block's split, mixed lengths, the fused blocks); an architecture where one
fails does without it (down to batched full bridge forwards).
"""

from __future__ import annotations

from bisect import bisect_right
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence
import weakref

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from biaslens.hooks import act_name, canonical
from biaslens.model import last_position_mask, logits_where

if TYPE_CHECKING:
    from biaslens.model import BiasModel
    from biaslens.prompts import TokenBatch

__all__ = ["COMPONENTS", "LAYER_HOOKS", "Patch", "ActSource", "SourceRun", "Base", "metric_rows",
           "PatchEngine", "window_layers", "role_masks", "position_masks", "layer_variants",
           "generic_patch_sweep", "patch_by_pos", "clean_source", "add_delta", "AttentionDone",
           "FusedGPT2", "fused_matmul", "onednn_ready", "RowGroup", "last_token_logits", "take_rows", "untap", "window_args", "column_width",
           "Variant", "patch_resid_pre_by_pos", "patch_mlp_out_by_pos", "patch_attn_out_by_pos"]

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
class SourceRun:
    """A source a :class:`PatchEngine` computes itself, in its base forward (one run for both
    where the widths match): ``batch``'s activations of ``hooks``; base row ``r`` reads source
    row ``rows[r]``. Its last-token logits land in ``engine.source_logits``."""

    batch: "TokenBatch"
    hooks: Sequence[str]
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


def column_width(metric: Callable, logits: torch.Tensor, cols: torch.Tensor,
                 prompt_idx: torch.Tensor) -> int | None:
    """``max(cols) + 1`` where ``metric`` gives the same values on ``logits`` (``-inf``
    outside ``cols``) cut to that width as on the whole rows, else None: a metric that reads
    only its declared columns can then be handed the narrow logits."""
    width = int(cols.max()) + 1
    try:
        a = metric_rows(metric, logits, prompt_idx)
        b = metric_rows(metric, logits[:, :width].contiguous(), prompt_idx)
    except Exception:
        return None
    same = a.shape == b.shape and bool(((a - b).abs() <= 1e-6 * (1 + a.abs())).all())
    return width if same else None


def take_rows(obj: Any, idx: torch.Tensor, n_rows: int) -> Any:
    """Index the batch axis of every tensor in a block's call arguments; drop KV caches."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim >= 2 and obj.shape[0] == n_rows else obj
    if isinstance(obj, tuple):
        return tuple(take_rows(o, idx, n_rows) for o in obj)
    if isinstance(obj, list):
        return [take_rows(o, idx, n_rows) for o in obj]
    if isinstance(obj, dict):
        return {k: take_rows(v, idx, n_rows) for k, v in obj.items()}
    if type(obj).__name__.endswith("Cache"):  # a transformers KV cache: never reuse the base's
        return _CACHE_SLOT
    return obj


_CACHE_SLOT = object()  # where a block's KV cache argument goes


def _same(a: Any, b: Any) -> bool:
    """Block call arguments equal: same structure, equal tensors, equal other values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and (a is b or torch.equal(a, b)))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    try:
        return bool(a is b or a == b)
    except Exception:
        return False


def _rows_of(obj: Any, idx: torch.Tensor, n_rows: int) -> Any:
    """Index the batch axis of every tensor in a block's call arguments (KV caches kept)."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim >= 2 and obj.shape[0] == n_rows else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows_of(o, idx, n_rows) for o in obj)
    if isinstance(obj, dict):
        return {k: _rows_of(v, idx, n_rows) for k, v in obj.items()}
    return obj


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


def window_args(obj: Any, lo: int, hi: int, width: int, kv: Any) -> Any:
    """Block call arguments for positions ``lo:hi`` of the base run's ``width``: a mask
    ``[.., width, width]`` keeps query rows ``lo:hi`` and key columns ``:hi``; position ids, rotary
    tables and cache positions (an axis of ``width`` at dim 1, or a 1-D ``[width]``) keep
    ``lo:hi``; the KV-cache slot gets ``kv`` (the prefix's keys and values, or None)."""
    if obj is _CACHE_SLOT:
        return kv
    if isinstance(obj, torch.Tensor):
        if lo == 0 and hi == width:
            return obj
        if obj.ndim == 4 and obj.shape[-2:] == (width, width):
            return obj[:, :, lo:hi, :hi]
        if obj.ndim == 1 and obj.shape[0] == width:
            return obj[lo:hi]
        if obj.ndim >= 2 and obj.shape[1] == width:
            return obj[:, lo:hi]
        return obj
    if isinstance(obj, tuple):
        return tuple(window_args(o, lo, hi, width, kv) for o in obj)
    if isinstance(obj, list):
        return [window_args(o, lo, hi, width, kv) for o in obj]
    if isinstance(obj, dict):
        out = {k: window_args(v, lo, hi, width, kv) for k, v in obj.items()}
        if kv is not None and "use_cache" in out:
            out["use_cache"] = True
        return out
    return obj


def _setter(act: torch.Tensor, hook: Any, parts: list, win: list[int]) -> torch.Tensor:
    """Hook: ``act[idx] = where(mask, src, act[idx])`` for each ``(idx, mask, src)`` (``idx``
    None: every row; the mask broadcast on the right), at positions ``win[0]:win[1]`` of the
    span the parts were cut to (the positions this block call computes)."""
    lo, hi = win
    for idx, mask, src in parts:
        m, s = mask[:, lo:hi], src[:, lo:hi].to(act.dtype)
        while m.ndim < act.ndim:
            m = m.unsqueeze(-1)
        if idx is None:
            act = torch.where(m, s, act)
        else:
            act = act.index_put((idx,), torch.where(m, s, act[idx]))
    return act


def _keep(act: torch.Tensor, hook: Any, cache: dict, name: str) -> torch.Tensor:
    """Hook: store ``act`` under the name it was requested by (aliases resolve to other names)."""
    cache[name] = act.detach()
    return act


def add_delta(act: torch.Tensor, hook: Any, delta: torch.Tensor) -> torch.Tensor:
    return act + delta.to(act.dtype)


class _BaseDone(Exception):
    """Raised where the base forward reaches the final norm (its input kept)."""


class _Lazy(dict):
    """A dict whose values may be zero-argument callables, replaced by their result when read."""

    def __getitem__(self, key):
        v = super().__getitem__(key)
        if callable(v):
            v = v()
            super().__setitem__(key, v)
        return v

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


class AttentionDone(Exception):
    """Raised once the final block's attention has run: its keys and values are in the cache,
    and the rest of the block is not needed at these positions."""


def _stop_after_attention(mod, args, out):
    raise AttentionDone


def _in_block(p: "Patch") -> bool:
    """The patch's hook fires inside block ``p.layer`` (re-entering there runs it)."""
    return p.hook.startswith(f"blocks.{p.layer}.")


def last_token_logits(bridge: Any, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                      hooks: Sequence = ()) -> torch.Tensor:
    """Logits at each row's last real token from one bridge forward, unembedding only those
    positions where the model takes it (:func:`biaslens.model.logits_where`)."""
    hooks = list(hooks)
    return logits_where(lambda **kw: bridge.run_with_hooks(ids, fwd_hooks=hooks, attention_mask=mask, **kw),
                        last_position_mask(ids, lengths))


# ---------------------------------------------------------------- fused blocks
_FUSED_POINTS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")


def _activation(mod: Any) -> str | None:
    """The fused kind of HF activation module ``mod`` (``"gelu_tanh"`` or ``"gelu"``; see
    :data:`_ACTS`), or None where the fused blocks do not compute it."""
    name = type(mod).__name__
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return "gelu_tanh"
    if name == "GELUActivation" and getattr(mod, "act", None) in (None, torch.nn.functional.gelu):
        return "gelu"
    return None


_ACTS: dict[str, Callable] = {"gelu_tanh": partial(torch.nn.functional.gelu, approximate="tanh"),
                              "gelu": torch.nn.functional.gelu}
# the same activations as oneDNN post-ops of a matmul: (attribute, algorithm)
_ONEDNN_ACTS = {None: ("none", ""), "gelu_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}
_onednn_state: list[bool] = []  # [] untested; [True] / [False] once tested in this process


def onednn_ready() -> bool:
    """Whether this torch has oneDNN's matmul with a fused activation (``mkldnn._linear_pointwise``,
    the op torch's own compiler emits for a CPU linear layer) and it agrees with ``addmm`` on a
    test product in this process; off where ``torch.backends.mkldnn.enabled`` is False."""
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    if not _onednn_state:
        ok = False
        try:
            op = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(s, generator=g) for s in ((5, 24), (24, 16), (16,)))
            with torch.no_grad():
                ref = {k: fn(torch.addmm(b, x, w)) for k, fn in _ACTS.items()}
                ref[None] = torch.addmm(b, x, w)
                ok = all(torch.allclose(op(x, w.t(), b, _ONEDNN_ACTS[k][0], [], _ONEDNN_ACTS[k][1]), r,
                                        rtol=1e-5, atol=1e-5) for k, r in ref.items())
        except (AttributeError, RuntimeError, TypeError):
            ok = False
        _onednn_state.append(ok)
    return _onednn_state[0]


def fused_matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv: bool,
           act: str | None = None) -> torch.Tensor:
    """``act(x @ w + b)`` (``conv``: ``w`` is ``[in, out]``, as GPT-2's ``Conv1D`` and
    ``torch.addmm``) or ``act(x @ w.T + b)`` (``w`` ``[out, in]``, as ``F.linear``). Where no
    gradient is recorded and the tensors are fp32 on the CPU it runs as one oneDNN matmul with the
    activation fused in (:func:`onednn_ready`): on the CPUs measured it is 10-25% faster than
    MKL's ``addmm`` at the shapes a block call has, and the activation costs no extra pass over the
    ``[positions, d_mlp]`` hidden activations. Elsewhere: ``addmm``/``linear`` and the activation.
    The two differ by rounding only (~1e-6 relative); the engine checks the fused blocks against
    the bridge's forward either way."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.numel()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                  or (b is not None and b.requires_grad)))
            and onednn_ready()):
        attr, algo = _ONEDNN_ACTS[act]
        return torch.ops.mkldnn._linear_pointwise(x, w.t() if conv else w, b, attr, [], algo)
    if conv:
        y = torch.addmm(b, x, w) if b is not None else x @ w
    else:
        y = torch.nn.functional.linear(x, w, b)
    return y if act is None else _ACTS[act](y)


_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _with_block_weights(method: Callable) -> Callable:
    """Run a :class:`FusedGPT2` method of block ``l`` inside :meth:`FusedGPT2.weights`."""
    from functools import wraps

    @wraps(method)
    def run(self, l: int, *args, **kwargs):
        with self.weights(l):
            return method(self, l, *args, **kwargs)

    return run


class FusedGPT2:
    """The blocks of a GPT-2-architecture bridge as a few fused ops on the weights the bridge
    itself computes with (its q/k/v copies, the HF output, MLP and norm weights):
    ``F.layer_norm``, one q/k/v matmul, ``scaled_dot_product_attention``, a fused GELU. The
    bridge's blocks run ~15 hook points, a layer norm and a GELU of several Python-level ops
    each and three q/k/v matmuls; on a CPU these make a block call ~1.2-1.35x slower. Patches
    can be set where the residual stream enters or leaves a block and at the attention and MLP
    outputs (:data:`_FUSED_POINTS`); anything else runs the bridge's blocks. The engine uses it
    only after its check against the bridge's own forward passes (re-entry logits to 1e-4).

    A block here reads only positions ``lo:`` of its input and the base run's keys and values
    before ``lo``; padding positions get causal attention alone (their values differ from the
    bridge's, and no real position reads them)."""

    def __init__(self, bridge: Any):
        self.blocks = list(bridge.blocks)
        self._qkv: dict[int, tuple] = {}
        self._tail = [p for m in (bridge.ln_final, bridge.unembed) for p in m.parameters()]
        # per block, the HF modules whose weights accelerate keeps offloaded (meta in the module,
        # materialised for a call by the module's hook): empty for a model loaded whole
        from accelerate.utils import has_offloaded_params

        self._offloaded = [[m for m in self._modules(blk) if has_offloaded_params(m)] for blk in self.blocks]
        self._depth = [0] * len(self.blocks)

    @staticmethod
    def _modules(blk: Any) -> list:
        """The HF modules whose weights block ``blk``'s fused ops read."""
        mods = [blk.ln1, blk.ln2, blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o,
                getattr(blk.mlp, "in"), blk.mlp.out]
        return [m.original_component for m in mods]

    @contextmanager
    def weights(self, l: int):
        """Block ``l``'s offloaded weights materialised while active (accelerate's
        ``align_module_device``, the hooks' own pre- and post-forward), so the fused ops run on a
        model placed by accelerate too; re-entrant; nothing to do for a model loaded whole.
        Tensors saved for a backward keep the materialised weights alive after the context."""
        mods = self._offloaded[l]
        if not mods or self._depth[l]:
            self._depth[l] += 1
            try:
                yield
            finally:
                self._depth[l] -= 1
            return
        from contextlib import ExitStack

        from accelerate.utils import align_module_device

        with ExitStack() as stack:
            for m in mods:
                stack.enter_context(align_module_device(m))
            self._depth[l] += 1
            try:
                yield
            finally:
                self._depth[l] -= 1

    @classmethod
    def build(cls, bridge: Any) -> "FusedGPT2 | None":
        """The fused blocks of ``bridge`` (one per bridge: its q/k/v matrices are built once),
        or None where its blocks are not GPT-2's."""
        if bridge in _FUSED:
            return _FUSED[bridge]
        got = cls._build(bridge)
        try:
            _FUSED[bridge] = got
        except TypeError:  # a bridge that takes no weak reference
            pass
        return got

    @classmethod
    def _build(cls, bridge: Any) -> "FusedGPT2 | None":
        cfg = getattr(bridge, "cfg", None)
        if cfg is None or getattr(cfg, "use_attn_result", False) or getattr(cfg, "use_split_qkv_input", False) \
                or getattr(cfg, "use_attn_in", False):
            return None
        try:
            for blk in bridge.blocks:
                hf, attn, mlp = blk.original_component, blk.attn, blk.mlp
                ha = attn.original_component
                ok = (type(hf).__name__ == "GPT2Block" and type(ha).__name__ == "GPT2Attention"
                      and not getattr(ha, "is_cross_attention", True) and getattr(ha, "scale_attn_weights", False)
                      and not getattr(ha, "scale_attn_by_inverse_layer_idx", True)
                      and not getattr(ha, "reorder_and_upcast_attn", True)
                      and all(isinstance(getattr(attn, n).original_component, torch.nn.Linear) for n in "qkv")
                      and type(attn.o.original_component).__name__ == "Conv1D"
                      and type(getattr(mlp, "in").original_component).__name__ == "Conv1D"
                      and type(mlp.out.original_component).__name__ == "Conv1D"
                      and _activation(mlp.original_component.act) is not None
                      and all(isinstance(ln.original_component, torch.nn.LayerNorm) and not ln.uses_rms_norm
                              for ln in (blk.ln1, blk.ln2)))
                if not ok:
                    return None
        except AttributeError:
            return None
        return cls(bridge)

    def parameters(self) -> list[torch.Tensor]:
        """Every weight the fused blocks read (and the final norm's and output embedding's)."""
        out = []
        for blk in self.blocks:
            mods = [blk.ln1, blk.ln2, blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o,
                    getattr(blk.mlp, "in"), blk.mlp.out]
            for m in mods:
                oc = m.original_component
                out += [t for t in (oc.weight, getattr(oc, "bias", None)) if isinstance(t, torch.Tensor)]
        return out + list(self._tail)

    def supports(self, names: Iterable[str]) -> bool:
        pts = set(_FUSED_POINTS)
        for n in names:
            head, _, point = str(n).partition(".")
            rest = point.split(".", 1)
            if head != "blocks" or len(rest) != 2 or not rest[0].isdigit() or rest[1] not in pts:
                return False
        return True

    def _qkv_weights(self, l: int):
        """The bridge's q, k, v weights as one ``[3 d, d]`` matrix (rebuilt when any changes)."""
        attn = self.blocks[l].attn
        mods = [getattr(attn, n).original_component for n in "qkv"]
        key = tuple((id(t), t._version) for m in mods for t in (m.weight, m.bias) if t is not None)
        hit = self._qkv.get(l)
        if hit is None or hit[0] != key:
            w = torch.cat([m.weight for m in mods])
            b = torch.cat([m.bias for m in mods]) if all(m.bias is not None for m in mods) else None
            hit = self._qkv[l] = (key, w, b)
        return hit[1], hit[2]

    @staticmethod
    def _norm(ln: Any, x: torch.Tensor) -> torch.Tensor:
        m = ln.original_component
        eps = getattr(ln.config, "eps", m.eps) if getattr(ln, "config", None) is not None else m.eps
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), m.weight, m.bias, eps)

    @_with_block_weights
    def kv(self, l: int, x: torch.Tensor, points: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, heads, pos, d_head]`` block ``l`` makes of input ``x``."""
        blk = self.blocks[l]
        x = _point(points, l, "hook_resid_pre", x)
        n, P, d = x.shape
        H = blk.attn.original_component.num_heads
        w, b = self._qkv_weights(l)
        kv = fused_matmul(self._norm(blk.ln1, x), w[d:], None if b is None else b[d:], False)
        k, v = kv.view(n, P, 2, H, d // H).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    @_with_block_weights
    def __call__(self, l: int, x: torch.Tensor, lo: int, prefix: tuple | None, points: dict,
                 keep_kv: list | None = None) -> torch.Tensor:
        """Block ``l`` at positions ``lo:lo + x.shape[1]``; ``prefix``: keys and values before;
        ``keep_kv``: gets this block's keys and values of these positions appended."""
        F = torch.nn.functional
        blk = self.blocks[l]
        attn, mlp = blk.attn, blk.mlp
        x = _point(points, l, "hook_resid_pre", x)
        n, P, d = x.shape
        ha = attn.original_component
        H, dh = ha.num_heads, ha.head_dim
        w, b = self._qkv_weights(l)
        q, k, v = fused_matmul(self._norm(blk.ln1, x), w, b, False).view(n, P, 3, H, dh).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if keep_kv is not None:
            keep_kv.append((k, v))
        if prefix is not None and prefix[0].shape[2]:
            k, v = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
        K = k.shape[2]
        if K == P:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(P, K, dtype=torch.bool, device=x.device).tril(K - P)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = attn.o.original_component
        a = fused_matmul(z.transpose(1, 2).reshape(n * P, d), o.weight, o.bias, True).view(n, P, d)
        x = _point(points, l, "hook_attn_out", a) + x
        fc, proj = getattr(mlp, "in").original_component, mlp.out.original_component
        h = fused_matmul(self._norm(blk.ln2, x).reshape(n * P, d), fc.weight, fc.bias, True,
                   _activation(mlp.original_component.act))
        m = fused_matmul(h, proj.weight, proj.bias, True).view(n, P, d)
        return _point(points, l, "hook_resid_post", x + _point(points, l, "hook_mlp_out", m))

    # -- several groups of rows through one block call: one matmul per weight for all their
    # positions, attention per group (its own positions and cached prefix)
    def _attend(self, l: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                prefix: tuple | None) -> torch.Tensor:
        """``[n, P, d]`` attention output (before the output projection) of one group."""
        if prefix is not None and prefix[0].shape[2]:
            k, v = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
        n, H, P, dh = q.shape
        K = k.shape[2]
        if K == P:
            z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(P, K, dtype=torch.bool, device=q.device).tril(K - P)
            z = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return z.transpose(1, 2).reshape(n, P, H * dh)

    def _heads(self, l: int, t: torch.Tensor, n: int, P: int, parts: int) -> tuple:
        ha = self.blocks[l].attn.original_component
        return tuple(x.transpose(1, 2) for x in t.view(n, P, parts, ha.num_heads, ha.head_dim).unbind(2))

    @_with_block_weights
    def packed(self, l: int, groups: list, taps: dict | None = None,
               before_attention: Callable | None = None, frozen: int = 0) -> None:
        """Block ``l`` over every group's ``x`` ``[n, P, d]`` (replaced by the block's output),
        the groups' tokens stacked in one matrix for the matmuls. ``taps``: gets, per point,
        the tensor on the forward's path there and which rows are whose (see :func:`untap`);
        a group with a ``kv`` list gets its keys and values appended. ``before_attention``:
        called with the groups once every group's keys and values of this call are in its
        ``kv_now`` (``[n, heads, P, d_head]`` each), before any attention: it may set a group's
        ``prefix`` from another's (rows sharing a prefix, computed in the same call). ``frozen``:
        the leading groups whose rows need no gradient (a backward skips their matmul rows)."""
        blk = self.blocks[l]
        xs = [_point(g.points, l, "hook_resid_pre", g.x) for g in groups]
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) if len(xs) > 1 else xs[0].reshape(-1, xs[0].shape[-1])
        d = flat.shape[1]
        w, b = self._qkv_weights(l)
        K = sum(x.shape[0] * x.shape[1] for x in xs[:frozen])
        qkv = _lin(self._norm(blk.ln1, flat), w, b, K, False)
        heads, at = [], 0
        for g, x in zip(groups, xs):
            n, P = x.shape[:2]
            q, k, v = self._heads(l, qkv[at: at + n * P], n, P, 3)
            if getattr(g, "kv", None) is not None:
                g.kv.append((k, v))
            heads.append((q, k, v))
            at += n * P
        if before_attention is not None:
            for g, (_, k, v) in zip(groups, heads):
                g.kv_now = (k, v)
            before_attention(groups)
        zs, at, layout = [], 0, []
        grad = torch.is_grad_enabled()
        for i, (g, x, (q, k, v)) in enumerate(zip(groups, xs, heads)):
            n, P = x.shape[:2]
            with torch.set_grad_enabled(grad and i >= frozen):
                zs.append(self._attend(l, q, k, v, g.prefix).reshape(n * P, d))
            layout.append((i, at, n, P, 0))
            at += n * P
        o = blk.attn.o.original_component
        a = self._each(groups, xs, l, "hook_attn_out", _lin(torch.cat(zs) if len(zs) > 1 else zs[0], o.weight, o.bias, K, True))
        h = a + flat
        m = self._each(groups, xs, l, "hook_mlp_out", self._mlp(l, h, K))
        out = self._each(groups, xs, l, "hook_resid_post", h + m)
        if taps is not None:
            for name, t in (("hook_resid_pre", flat), ("hook_attn_out", a), ("hook_mlp_out", m)):
                taps[f"blocks.{l}.{name}"] = [(t, layout)]
        at = 0
        for g, x in zip(groups, xs):
            n, P = x.shape[:2]
            g.x = out[at: at + n * P].view(n, P, d)
            at += n * P

    @_with_block_weights
    def packed_last(self, l: int, groups: list, taps: dict | None = None,
                    before_attention: Callable | None = None, frozen: int = 0) -> list[torch.Tensor]:
        """The final block over every group, whole at each row's last position (``x[:, -1]``)
        only: the positions before it get keys and values alone (nothing else there reaches
        the last position's output). Returns the groups' output residuals ``[n, d]`` at the last
        position. ``taps``, ``before_attention`` and ``frozen`` as in :meth:`packed` (attention
        and MLP outputs at the last position only)."""
        blk = self.blocks[l]
        xs = [_point(g.points, l, "hook_resid_pre", g.x) for g in groups]
        d = xs[0].shape[-1]
        w, b = self._qkv_weights(l)
        mids = [x[:, :-1].reshape(-1, d) for x in xs if x.shape[1] > 1]
        K_mid = sum(x.shape[0] * (x.shape[1] - 1) for x in xs[:frozen])
        K = sum(x.shape[0] for x in xs[:frozen])
        kv_mid = (_lin(self._norm(blk.ln1, torch.cat(mids)), w[d:], None if b is None else b[d:], K_mid, False)
                  if mids else None)
        last = torch.cat([x[:, -1] for x in xs])
        qkv = _lin(self._norm(blk.ln1, last), w, b, K, False)
        heads, at_mid, at = [], 0, 0
        for g, x in zip(groups, xs):
            n, P = x.shape[:2]
            q, k, v = self._heads(l, qkv[at: at + n], n, 1, 3)
            km, vm = k[:, :, :0], v[:, :, :0]
            if P > 1:
                km, vm = self._heads(l, kv_mid[at_mid: at_mid + n * (P - 1)], n, P - 1, 2)
                at_mid += n * (P - 1)
            if getattr(g, "kv", None) is not None:
                g.kv.append((torch.cat([km, k], 2), torch.cat([vm, v], 2)))
            heads.append((q, k, v, km, vm))
            at += n
        if before_attention is not None:
            for g, (_, k, v, km, vm) in zip(groups, heads):
                g.kv_now = (torch.cat([km, k], 2), torch.cat([vm, v], 2))
            before_attention(groups)
        zs, at, layout = [], 0, []
        grad = torch.is_grad_enabled()
        for i, (g, x, (q, k, v, km, vm)) in enumerate(zip(groups, xs, heads)):
            n, P = x.shape[:2]
            prefix = g.prefix
            if P > 1:
                prefix = (km, vm) if prefix is None else (torch.cat([prefix[0], km], 2), torch.cat([prefix[1], vm], 2))
            with torch.set_grad_enabled(grad and i >= frozen):
                zs.append(self._attend(l, q, k, v, prefix).reshape(n, d))
            g.win[:] = [P - 1, P]  # the setters now see the last position only
            layout.append((i, at, n, 1, P - 1))
            at += n
        ones = [x[:, -1:] for x in xs]
        o = blk.attn.o.original_component
        a = self._each(groups, ones, l, "hook_attn_out", _lin(torch.cat(zs) if len(zs) > 1 else zs[0], o.weight, o.bias, K, True))
        h = a + last
        m = self._each(groups, ones, l, "hook_mlp_out", self._mlp(l, h, K))
        out = self._each(groups, ones, l, "hook_resid_post", h + m)
        if taps is not None:
            taps[f"blocks.{l}.hook_resid_pre"] = [(x, [(i, 0, x.shape[0], x.shape[1], 0)]) for i, x in enumerate(xs)]
            taps[f"blocks.{l}.hook_attn_out"] = [(a, layout)]
            taps[f"blocks.{l}.hook_mlp_out"] = [(m, layout)]
        res, at = [], 0
        for x in xs:
            res.append(out[at: at + x.shape[0]])
            at += x.shape[0]
        return res

    @_with_block_weights
    def _mlp(self, l: int, h: torch.Tensor, k: int = 0) -> torch.Tensor:
        blk = self.blocks[l]
        fc, proj = getattr(blk.mlp, "in").original_component, blk.mlp.out.original_component
        u = _lin(self._norm(blk.ln2, h), fc.weight, fc.bias, k, True, _activation(blk.mlp.original_component.act))
        return _lin(u, proj.weight, proj.bias, k, True)

    @staticmethod
    def _each(groups: list, xs: list, l: int, name: str, flat: torch.Tensor) -> torch.Tensor:
        """Apply each group's setter at point ``name`` to its rows of ``flat`` (in place)."""
        at = 0
        for g, x in zip(groups, xs):
            n, P = x.shape[:2]
            fn = g.points.get(f"blocks.{l}.{name}")
            if fn is not None:
                part = flat[at: at + n * P].view(n, P, -1)
                res = fn(part, None)
                if res is not part:
                    flat[at: at + n * P] = res.reshape(n * P, -1)
            at += n * P
        return flat


class _TailGrad(torch.autograd.Function):
    """``x @ w + b`` (``conv``: ``w`` is ``[in, out]``, as ``torch.addmm``) or ``x @ w.T + b``
    (``F.linear``) whose backward gives ``x`` a gradient at rows ``k:`` only (zeros before: rows
    that ride in the matmul and need none). The weights get none (they are frozen)."""

    @staticmethod
    def forward(ctx, x, w, b, k, conv):
        ctx.save_for_backward(w)
        ctx.k, ctx.conv = k, conv
        return fused_matmul(x, w, b, conv)  # no gradient recorded in here: oneDNN where it applies

    @staticmethod
    def backward(ctx, gy):
        (w,) = ctx.saved_tensors
        k = ctx.k
        gx = gy.new_empty((gy.shape[0], w.shape[0] if ctx.conv else w.shape[1]))
        gx[:k] = 0
        torch.matmul(gy[k:], w.T if ctx.conv else w, out=gx[k:])
        return gx, None, None, None, None


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int, conv: bool,
         act: str | None = None) -> torch.Tensor:
    """A fused block's matmul, then ``act``: through :class:`_TailGrad` where ``x`` needs a
    gradient and the weights none (rows before ``k`` frozen; ``k`` = 0: none), else plain
    (:func:`fused_matmul`)."""
    if torch.is_grad_enabled() and x.requires_grad and not w.requires_grad \
            and (b is None or not b.requires_grad):
        y = _TailGrad.apply(x, w, b, k, conv)
        return y if act is None else _ACTS[act](y)
    return fused_matmul(x, w, b, conv, act)


def untap(entries: list, values: Sequence[torch.Tensor], groups: list, rows: int, width: int) -> torch.Tensor:
    """``[rows, width, ...]`` from tapped tensors (or their gradients, ``values``, one per
    entry): each group's rows at its positions ``lo + pos``, zeros elsewhere."""
    out = None
    for (_, layout), val in zip(entries, values):
        for gi, at, n, P, pos in layout:
            g = groups[gi]
            part = val if val.ndim == 3 else val[at: at + n * P].reshape(n, P, -1)
            if out is None:
                out = part.new_zeros((rows, width, part.shape[-1]))
            out[g.rows[:n], g.lo + pos: g.lo + pos + P] = part
    return out

def _point(points: dict, layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
    fn = points.get(f"blocks.{layer}.{name}")
    return act if fn is None else fn(act, None)


class RowGroup:
    """Rows of one packed call sharing their span ``lo:hi`` (all end at ``hi - 1``): base rows,
    the block each enters at, the setter hooks by name and the window they read."""

    def __init__(self, rows: torch.Tensor, starts: list[int], lo: int, hi: int, points: dict, win: list[int]):
        self.rows, self.starts, self.lo, self.hi = rows, starts, lo, hi
        self.points, self.win = points, win
        self.x: torch.Tensor | None = None
        self.joined, self.prefix = 0, None


# a pass of a token through the final block's attention alone, as a fraction of a whole block
# (GPT-2: q, k, v and output projections 4 d² of 12 d² MACs): the planner's estimate
_ATTN_FRACTION = 1 / 3


class PatchEngine:
    """Exact activation patching of many variants over one base run (see module docstring).

    ``sources``: name → :class:`ActSource`; the base run's own activations of ``cache_hooks`` are
    added as source ``"base"`` (used to *freeze* a path, e.g. ROME's severed MLP).
    ``sources`` values may be :class:`SourceRun` s (computed in the base forward). ``max_tokens``:
    positions per block call; ``merge_tokens``: what one more bridge block call costs, in positions
    computed (the planner merges groups while that saves work; 0: never); ``fused``: use
    :class:`FusedGPT2` where it applies and passes the check (False: the bridge's blocks always).
    After construction ``early_start``, ``skip_prefix``, ``split_final``, ``mix_lengths`` and
    ``fused`` say which shortcuts passed their checks.
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
        fused: bool = True,
    ):
        self.model, self.base, self.metric = model, base, metric
        self._use_fused = fused
        self.sources = dict(sources)
        self.max_tokens, self.progress = max_tokens, progress
        # a block call reads all its weights whatever the batch, and small models pay Python
        # overhead per call: both are worth ~32 positions of work for d = 768, more below
        self.merge_tokens = (max(32, 2**24 // model.d_model**2) if merge_tokens is None
                             else merge_tokens)
        self.n_layers = model.n_layers
        # fused calls: positions per call such that the MLP's hidden activations stay ~24 MB
        # (larger calls run slower per position on a CPU: they spill out of its caches)
        self.pack_tokens = min(max_tokens, max(256, 6 * 2**20 // max(1, int(getattr(model, "d_mlp", 0) or 4 * model.d_model))))
        # work done by run(): chunks, block calls, block-token passes (whole blocks), final-block
        # positions run through attention only, unembedded rows, (variant, row) no-ops, positions
        # run through one block's MLP alone (folded attention-output patches)
        self.stats = {"chunks": 0, "block_calls": 0, "block_tokens": 0, "attn_tokens": 0,
                      "unembed_rows": 0, "noop_rows": 0, "mlp_tokens": 0}
        self.skip_noops = skip_noops
        self._eq: dict[tuple[str, str], torch.Tensor] = {}
        self._derived: dict[str, ActSource] = {}  # sources computed from others (see _folded)
        self._pending: dict[str, tuple] = {}  # derived sources filled where needed (_fill_derived)
        self.source_logits: dict[str, torch.Tensor] = _Lazy()  # last-token logits of each SourceRun
        self.checks = 0  # re-entry checks run (see _settle)
        # base activations of every hook a source can patch (to recognise no-op patches)
        patchable = set().union(*(s.acts if isinstance(s, ActSource) else set(s.hooks)
                                  for s in self.sources.values())) if skip_noops else set()
        self._run_base(set(cache_hooks), patchable, early_start, reentry_check)

    # ------------------------------------------------------------ base run
    def _embed_hook(self, rows: torch.Tensor | None = None):
        d = self.base.embed_delta
        if d is None:
            return []
        return [(act_name("embed"), partial(add_delta, delta=d if rows is None else d[rows]))]

    def _run_base(self, cache_hooks: set[str], patchable: set[str], early_start: bool,
                  reentry_check: tuple[int, int] | None = None) -> None:
        """Run the base rows once (in row chunks), keeping the residual entering every block,
        ``cache_hooks``, each block's call arguments and its keys and values (from the KV cache),
        all merged over chunks, and the last-token logits. Then check the shortcuts (see
        :meth:`_settle`)."""
        b = self.base
        width = int(b.input_ids.shape[1])
        step = max(1, self.max_tokens // max(1, width))
        chunks = [torch.arange(s, min(len(b), s + step), device=b.input_ids.device)
                  for s in range(0, len(b), step)]
        names = cache_hooks | patchable | self._fold_hooks()
        # sources to compute in the base forward itself (rows of the same width: one run)
        runs = {k: v for k, v in self.sources.items() if isinstance(v, SourceRun)}
        ride = [(k, r) for k, r in runs.items() if int(r.batch.input_ids.shape[1]) == width]
        for k, r in runs.items():
            if all(k != k2 for k2, _ in ride):
                self.sources[k], self.source_logits[k] = clean_source(self.model, r.batch, r.hooks, r.rows)
        # blocks whose attention takes the cache as past_key_values: all of them where block 0's
        # attention ignores the cache under the name the block passes it (one block run to see)
        self._alias: list[int] = list(range(self.n_layers)) if self._ignores_cache(chunks[0][:1]) else []
        first = self._run_base_rows(chunks[0], names, ride)
        empty = [l for l, kv in enumerate(first[4]) if kv is None]
        if empty and not self._alias:  # some attention ignored the cache: again, aliasing those
            del first
            self._alias = empty
            first = self._run_base_rows(chunks[0], names, ride)
            if any(kv is None for kv in first[4]):
                self._alias = []
        for k, r in ride:
            acts, last_k = first[5][k]
            self.sources[k], self.source_logits[k] = ActSource(acts, r.rows), last_k
        parts = [first] + [self._run_base_rows(r, names) for r in chunks[1:]]
        cache = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        if all(p[1][0] is not None for p in parts):
            self._base_logits, self._base_final = torch.cat([p[1][0] for p in parts]), None
        else:
            self._base_logits, self._base_final = None, torch.cat([p[1][1] for p in parts])
        captured = {l: _merge([p[2][l] for p in parts], [p[3] for p in parts])
                    for l in parts[0][2] if all(l in p[2] for p in parts)}
        kvs = [p[4] for p in parts]
        self._kv = None  # per block: the base rows' (keys, values)
        if all(len(kv) == self.n_layers and all(t is not None for t in kv) for kv in kvs):
            self._kv = kvs[0] if len(kvs) == 1 else [
                (torch.cat([kv[l][0] for kv in kvs]), torch.cat([kv[l][1] for kv in kvs]))
                for l in range(self.n_layers)]
        rows = torch.arange(len(b), device=b.input_ids.device)
        self._cols = self._column_head()
        self._metric_width = int(self.model.bridge.cfg.d_vocab)
        self.base_metric = metric_rows(self.metric, self._base_ref(), b.prompt_idx)
        self.base_cache = cache
        self._block_args = captured
        self.sources["base"] = ActSource({k: v for k, v in cache.items() if k in cache_hooks}, rows)
        self._fold, self._fold_attn = self._fold_layers()
        self._settle(early_start and len(captured) == self.n_layers, reentry_check)

    @property
    def base_logits(self) -> torch.Tensor:
        """The base rows' last-token logits (computed on first read from the final residuals the
        base run kept)."""
        if self._base_logits is None:
            with torch.no_grad():
                self._base_logits = self._unembed(self._base_final, full=True)
        return self._base_logits

    def _base_ref(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The base rows' last-token logits where the metric and the checks read them: at the
        metric's columns only (``-inf`` elsewhere, the vocabulary wide) where it declares them
        and the full logits were not read yet; else the full logits."""
        if self._base_logits is None and self._cols is not None:
            x = self._base_final if rows is None else self._base_final[rows]
            with torch.no_grad():
                return self._unembed(x, width=int(self.model.bridge.cfg.d_vocab))
        return self.base_logits if rows is None else self.base_logits[rows]

    def _ignores_cache(self, rows: torch.Tensor) -> bool:
        """Block 0 run alone (the forward stopped after it): True when its attention left the KV
        cache the block was handed empty."""
        bridge, b = self.model.bridge, self.base
        captured: dict[int, tuple] = {}

        def pre(mod, args, kwargs):
            captured[0] = (args[1:], kwargs)

        handles = [bridge.blocks[0].register_forward_pre_hook(pre, with_kwargs=True),
                   bridge.blocks[0].register_forward_hook(_stop_after_attention)]
        try:
            with torch.no_grad():
                bridge(b.input_ids[rows], attention_mask=b.attention_mask[rows])
        except AttentionDone:
            pass
        except Exception:  # no block 0 to stop after: the base run will tell
            return False
        finally:
            for h in handles:
                h.remove()
        kv = _cache_kv(_find_cache(captured.get(0)))
        return bool(kv) and kv[0] is None

    # ------------------------------------------------- MLP outputs folded forward
    def _mlp_layers(self, comp: str = "mlp_out") -> list[int]:
        """Layers whose MLP output (or ``comp``) some source can patch."""
        have = set().union(*(s.acts if isinstance(s, ActSource) else set(s.hooks) for s in self.sources.values()))
        return [l for l in range(self.n_layers) if act_name(comp, l) in have]

    def _fold_hooks(self) -> set[str]:
        """Base-run hooks that show whether a block's output is its ``resid_mid`` plus its MLP
        output (then a patch of the MLP output is a patch of the next block's input), and whether
        ``resid_mid`` is the block's input plus its attention output (then a patch of the
        attention output is one of the next block's input too, through the MLP at its positions)."""
        mlp, attn = self._mlp_layers(), self._mlp_layers("attn_out")
        have = getattr(self.model.bridge, "hook_dict", {})
        names = {act_name(c, l) for l in set(mlp) | set(attn) for c in ("resid_mid", "mlp_out")}
        names |= {act_name("attn_out", l) for l in attn}
        names = names | {act_name("resid_post", self.n_layers - 1)} if names else set()
        return names if all(n in have for n in names) else set()  # some models have no resid_mid

    def _fold_layers(self) -> tuple[set[int], set[int]]:
        """Layers ``l`` where the base run's block output equals ``resid_mid + mlp_out``
        bitwise (the residual sum is the block's last operation): there, setting the MLP output
        at some positions is setting the next block's input (or the final residual) there to
        ``resid_mid + source``, and block ``l`` need not run. Second: those of them where
        ``resid_mid`` is ``resid_pre + attn_out`` bitwise too (an attention-output patch at
        position ``p`` changes block ``l``'s output at ``p`` alone, to ``m + MLP(m)`` with
        ``m = resid_pre + source``: the next block's input, computed at ``p`` only)."""
        c, L, out, attn = self.base_cache, self.n_layers, set(), set()
        for l in sorted(set(self._mlp_layers()) | set(self._mlp_layers("attn_out"))):
            nxt = act_name("resid_pre", l + 1) if l + 1 < L else act_name("resid_post", L - 1)
            mid, mlp = c.get(act_name("resid_mid", l)), c.get(act_name("mlp_out", l))
            if mid is not None and mlp is not None and nxt in c and mid.shape == c[nxt].shape \
                    and torch.equal(mid + mlp, c[nxt]):
                out.add(l)
                a, pre = c.get(act_name("attn_out", l)), c.get(act_name("resid_pre", l))
                if a is not None and pre is not None and a.shape == mid.shape and torch.equal(pre + a, mid):
                    attn.add(l)
        return out, attn

    def _folded(self, var: Variant, rows: torch.Tensor) -> Variant:
        """A one-patch variant setting an MLP output where that folds: the same values set at the
        next block's input (layer ``L`` for the final residual) from a derived source. Likewise an
        attention output, where the fused blocks run (its derived values, ``m + MLP(m)``, are
        computed by :meth:`_fill_derived` at the positions it sets in base ``rows``)."""
        if len(var) != 1:
            return var
        p = var[0]
        mlp = p.hook == act_name("mlp_out", p.layer) and p.layer in self._fold
        attn = p.hook == act_name("attn_out", p.layer) and p.layer in self._fold_attn and self.fused
        if p.unit is not None or not (mlp or attn):
            return var
        L, nxt = self.n_layers, p.layer + 1
        hook = act_name("resid_pre", nxt) if nxt < L else act_name("resid_post", L - 1)
        name = f"{p.source}:{p.hook}->{hook}"
        if name not in self._derived:
            base_rows = torch.arange(len(self.base), device=self.base.input_ids.device)
            if mlp:
                mid = self.base_cache[act_name("resid_mid", p.layer)]
                acts = mid + self._source(p.source, p.hook, base_rows).to(mid.dtype)
            else:  # filled where needed; the base run's values elsewhere (never read)
                acts = self.base_cache[hook].clone()
                self._pending[name] = (p.source, p.hook, p.layer, hook,
                                       torch.zeros(acts.shape[:2], dtype=torch.bool, device=acts.device),
                                       torch.zeros(acts.shape[:2], dtype=torch.bool, device=acts.device))
            self._derived[name] = ActSource({hook: acts}, base_rows)
        if name in self._pending:
            need = self._pending[name][4]
            need[rows] |= p.positions[rows].to(need.device)
        return (Patch(hook, nxt, p.positions, name),)

    def _fill_derived(self) -> None:
        """The derived next-block inputs of folded attention-output patches at the positions
        registered since the last call: ``m + MLP(m)``, ``m = resid_pre + source``, one fused
        MLP call per layer over all of them."""
        for name, (src, hook, l, nxt, need, done) in self._pending.items():
            todo = need & ~done
            if not bool(todo.any()):
                continue
            r, q = todo.nonzero(as_tuple=True)
            pre = self.base_cache[act_name("resid_pre", l)]
            m = pre[r, q] + self._source(src, hook, r)[torch.arange(len(r), device=r.device), q].to(pre.dtype)
            acts = self._derived[name].acts[nxt]
            with torch.no_grad():
                acts[r, q] = (m + self._fused._mlp(l, m)).to(acts.dtype)
            done |= todo
            self.stats["mlp_tokens"] += len(r)

    def _settle(self, able: bool, reentry_check: tuple[int, int] | None) -> None:
        """Which shortcuts this model allows, each checked against the base run's own logits:
        ``fused`` (the :class:`FusedGPT2` blocks, whose calls split the final block and never mix
        lengths), else through the bridge's blocks ``early_start`` (re-entry at a block),
        ``skip_prefix`` (a cached prefix), ``split_final`` (the final block's attention alone at
        positions before the last) and ``mix_lengths`` (rows of different lengths in one call),
        tried together first, then fewer; the whole again with every logit column where the
        metric declared fewer. Where the fused blocks pass, the bridge's are checked on first
        need (:meth:`_bridge_ok`)."""
        L = self.n_layers
        self.early_start = self.skip_prefix = self.split_final = self.mix_lengths = self.fused = False
        self._metric_width = int(self.model.bridge.cfg.d_vocab)
        self._fused = FusedGPT2.build(self.model.bridge) if self._use_fused else None
        if reentry_check is not None:
            start, skip = reentry_check
        else:
            start, skip = 0, 1 if self._kv is not None else 0
        if not able or (skip and self._kv is None):
            return
        # blocks of one class handed the same arguments behave alike: checking the last three
        # (a block's output into the next, a cached prefix at each, the split) stands for all
        if self._same_blocks():
            start = max(start, L - 3)
        self._entry = (start, skip, reentry_check is not None)
        self._bridge: bool | None = None  # the bridge's blocks re-enter (None: not checked yet)
        for cols in ((self._cols, None) if self._cols is not None else (None,)):
            self._cols = cols
            if self._fused is not None and self._kv is not None:
                self.fused = True
                if self._check(start, skip, True, False) and (
                        reentry_check is not None or not skip or self._check(max(0, L - 2), 0, True, False)):
                    self.early_start = True  # split_final, mix_lengths: the bridge's, once checked
                    self.skip_prefix = bool(skip) or reentry_check is not None
                    self._metric_width = self._column_width()
                    return
                self.fused = False
            if self._settle_bridge():
                self._metric_width = self._column_width()
                return
        self._cols, self.fused, self._bridge = None, False, False

    def _settle_bridge(self) -> bool:
        """Check re-entry through the bridge's own blocks (needed by patches the fused blocks
        cannot set, and by :meth:`forward_from`): the split and mixed lengths together first,
        then fewer. Sets the flags; False where none passes."""
        start, skip, named = self._entry
        fused, self.fused = self.fused, False
        try:
            for split, mixed in ((True, True), (False, True), (True, False), (False, False)):
                if not self._check(start, skip, split, mixed):
                    continue
                # a caller naming its only re-entry point is checked there; else re-entry
                # without a prefix (positions from 0) is checked too, where it is cheap
                if not named and skip and not self._check(max(0, self.n_layers - 2), 0, split, mixed):
                    continue
                self._bridge, self.early_start, self.split_final, self.mix_lengths = True, True, split, mixed
                self.skip_prefix = bool(skip) or named
                return True
            self._bridge = False
            return False
        finally:
            self.fused = fused

    def _bridge_ok(self) -> bool:
        """The bridge's blocks re-enter (checked on first need where the fused blocks passed)."""
        if self._bridge is None:
            early, prefix = self.early_start, self.skip_prefix
            if not self._settle_bridge():
                self.early_start, self.skip_prefix = early, prefix  # the fused blocks still re-enter
        return bool(self._bridge)

    def _same_blocks(self) -> bool:
        """Every block is of one class (its attention and MLP too) and was handed arguments equal
        to the last block's (tensors equal, the KV cache aside)."""
        blocks = self.model.bridge.blocks

        def kind(bl):
            return tuple(type(getattr(bl, n, None)) for n in ("original_component", "attn", "mlp"))

        ref_kind, ref_args = kind(blocks[-1]), take_rows(self._block_args[self.n_layers - 1], None, -1)
        return all(kind(bl) == ref_kind and _same(take_rows(self._block_args[l], None, -1), ref_args)
                   for l, bl in enumerate(blocks))

    def _check(self, start: int, skip: int, split: bool, mixed: bool) -> bool:
        """Re-entering at block ``start`` after ``skip`` cached positions reproduces the full
        forward's last-token logits: a few rows of the commonest length computing only their own
        positions (the final block split if ``split``) and, if ``mixed``, two rows of different
        lengths in one padded call (from block ``L - 2``: the same arguments every block)."""
        self.checks += 1
        lengths = self.base.lengths
        ok = (lengths > skip).nonzero().squeeze(1)
        if not len(ok):
            return skip == 0
        ls = lengths[ok]
        vals, counts = ls.unique(return_counts=True)
        uniform = ok[ls == vals[counts.argmax()]][:2]
        runs = [(uniform, start, split)]
        if mixed and len(vals) > 1 and not self.fused:  # fused calls never mix lengths
            other = ok[ls != lengths[uniform[0]]][:1]
            runs.append((torch.cat([uniform[:1], other]), max(start, self.n_layers - 2), False))
        saved = dict(self.stats)
        try:
            for rows, s, sp in runs:
                hi = int(lengths[rows].max())
                with torch.no_grad():
                    again = self._forward_rows(rows, [s] * len(rows), skip, hi, [], split=sp,
                                               fused=self.fused)
                ref = self._base_ref(rows)
                if self._cols is not None:
                    again, ref = again[:, self._cols[0]], ref[:, self._cols[0]]
                scale = float(ref.abs().max()) + 1.0
                if not bool((again - ref).abs().max() <= 1e-4 * scale):
                    return False
        except Exception:  # an architecture whose blocks cannot be called on their own so
            return False
        finally:
            self.stats = saved
        return True

    def _run_base_rows(self, rows: torch.Tensor, cache_hooks: set[str], ride: Sequence = ()):
        """One base forward over ``rows``, with the rows of the :class:`SourceRun` s ``ride``
        appended: (cache, last-token logits, block arguments, n rows, each block's (keys, values)
        or None, {source: (its activations, its last-token logits)}), all but the last of the
        base rows alone."""
        b, bridge = self.base, self.model.bridge
        own = {act_name("resid_pre", l) for l in range(self.n_layers)} | cache_hooks
        names = set(own)
        ids, mask, lengths = b.input_ids[rows], b.attention_mask[rows], b.lengths[rows]
        n, spans = len(rows), []
        for k, r in ride:
            spans.append((k, r, len(ids), len(ids) + len(r.batch)))
            ids = torch.cat([ids, r.batch.input_ids.to(ids.device)])
            mask = torch.cat([mask, r.batch.attention_mask.to(mask.device)])
            lengths = torch.cat([lengths, r.batch.lengths.to(lengths.device)])
            names = names | set(r.hooks)
        captured: dict[int, tuple] = {}
        handles = []
        for l, block in enumerate(bridge.blocks):
            def pre(mod, args, kwargs, l=l):
                captured[l] = (args[1:], kwargs)
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        cache: dict[str, torch.Tensor] = {}
        hooks = [(h, partial(_keep, cache=cache, name=h)) for h in names]
        # the forward stops where the final norm starts, its input kept: a full-vocabulary
        # unembedding reads the whole output embedding (~65 ms on a CPU at GPT-2's 50k x 768,
        # whatever the rows), so the logits are computed from it only when read (base_logits)
        final: dict[str, torch.Tensor] = {}
        ln = getattr(bridge, "ln_final", None)
        if isinstance(ln, torch.nn.Module):
            def halt(mod, args, kwargs):
                final["x"] = args[0] if args else next(iter(kwargs.values()))
                raise _BaseDone

            handles.append(ln.register_forward_pre_hook(halt, with_kwargs=True))
        d = b.embed_delta
        if d is not None:
            d = d[rows]
            if len(ids) > n:  # source rows get no perturbation
                d = torch.cat([d, d.new_zeros((len(ids) - n,) + d.shape[1:])])
            hooks.insert(0, (act_name("embed"), partial(add_delta, delta=d)))
        last = None
        try:
            with torch.no_grad(), _cache_as_past_key_values(bridge, self._alias):
                last = last_token_logits(bridge, ids, mask, lengths, hooks)
        except _BaseDone:
            pass
        finally:
            for h in handles:
                h.remove()
        if last is None:  # the final residual at each row's last token: (None, residual)
            x = final["x"]
            last = (None, x[torch.arange(len(ids), device=x.device), lengths.to(x.device) - 1])
        else:
            last = (last, None)
        kv = [None if t is None else (t[0][:n], t[1][:n]) for t in _cache_kv(_find_cache(captured.get(0)))]
        rode = {k: ({h: cache[h][a:z] for h in r.hooks},
                    last[0][a:z] if last[0] is not None else partial(self._unembed, last[1][a:z], True))
                for k, r, a, z in spans}
        if spans:
            idx = torch.arange(n, device=ids.device)
            captured = {l: _rows_of(c, idx, len(ids)) for l, c in captured.items()}
            cache = {h: cache[h][:n] for h in own}
            last = tuple(None if t is None else t[:n] for t in last)
        return cache, last, captured, n, kv, rode

    def _column_head(self):
        """``(columns, output embedding)`` when the metric declares the columns it reads and the
        output embedding is a plain linear map, else None."""
        cols = getattr(self.metric, "columns", None)
        head = self.model.hf.get_output_embeddings() if cols is not None else None
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            return None
        dev = head.weight.device  # meta: offloaded by accelerate (runs on the model's device)
        return cols.to(self.model.device if dev.type == "meta" else dev), head

    def _column_width(self) -> int:
        """Width of the logits handed to the metric: up to its last declared column (it reads no
        other, and every other is ``-inf``), where that gives the base run's values
        (:func:`column_width`); the vocabulary otherwise. A log-softmax over 50k mostly ``-inf``
        columns per row would cost more than the two columns' unembedding."""
        vocab = int(self.model.bridge.cfg.d_vocab)
        if self._cols is None:
            return vocab
        cols = self._cols[0]
        ref = self._base_ref()
        full = torch.full_like(ref, float("-inf"))
        full[:, cols] = ref[:, cols]
        return column_width(self.metric, full, cols, self.base.prompt_idx) or vocab

    def _unembed(self, resid: torch.Tensor, full: bool = False, width: int | None = None) -> torch.Tensor:
        """Logits of final residuals: full, or only the metric's columns (``-inf`` elsewhere, up
        to the last of them, or ``width`` wide)."""
        bridge = self.model.bridge
        if self._cols is None or full:
            return bridge.unembed(bridge.ln_final(resid))
        cols, head = self._cols
        h = bridge.ln_final(resid)
        out = torch.full((h.shape[0], width or self._metric_width), float("-inf"), dtype=h.dtype, device=h.device)
        from accelerate.utils import align_module_device  # an offloaded head: real weights inside

        with align_module_device(getattr(head, "original_component", None) or head):
            bias = getattr(head, "bias", None)
            out[:, cols] = torch.nn.functional.linear(  # sliced per call: the weights may change
                h, head.weight[cols].to(h.dtype), None if bias is None else bias[cols].to(h.dtype))
        return out

    # ------------------------------------------------------------- forwards
    def _forward_rows(self, rows: torch.Tensor, starts: Sequence[int], lo: int, hi: int,
                      hooks: list, win: list[int] | None = None, full: bool = False,
                      split: bool = False, fused: bool = False) -> torch.Tensor:
        """Last-token logits of base ``rows``, each re-run from its block ``starts[i]`` (a
        non-decreasing list: the rows entering at block ``j`` join the batch there, from the base
        residual), computing positions ``lo:hi`` only: earlier ones cannot change and come from
        the base run's KV cache; later ones are padding for every row. ``split``: every row ends
        at ``hi - 1``, and the final block runs its attention alone at positions ``lo:hi-1`` (all
        that later positions read of them) and the whole block at ``hi - 1`` only. ``win``: the
        position window the setter hooks read, moved for the split. Differentiable (no
        ``no_grad`` here): gradients reach tensors the hooks add. ``fused``: the blocks run as
        :class:`FusedGPT2` (the hooks must be setters at its points)."""
        bridge, b, L = self.model.bridge, self.base, self.n_layers
        n_base, width, n = len(b), int(b.input_ids.shape[1]), len(rows)
        split = split and hi - lo > 1
        if fused:
            return self._forward_fused(rows, starts, lo, hi, dict(hooks), win, full, split)
        kv = None
        if lo or split:
            from transformers import DynamicCache

            kv = DynamicCache()
        win = [0, hi - lo] if win is None else win
        x, joined = None, 0
        with bridge.hooks(fwd_hooks=hooks), _cache_as_past_key_values(bridge, self._alias):
            for j in range(starts[0], L):
                k = bisect_right(starts, j)
                if k > joined:  # rows entering here start from the base run's residual
                    new = self.base_cache[act_name("resid_pre", j)][rows[joined:k], lo:hi]
                    x, joined = (new if x is None else torch.cat([x, new])), k
                active = rows if k == n else rows[:k]
                if lo:
                    keys, values = self._kv[j]
                    kv.update(keys[active, :, :lo], values[active, :, :lo], j)
                kv_j = kv if lo or (split and j == L - 1) else None
                args, kwargs = self._block_args[j]
                args, kwargs = take_rows(args, active, n_base), take_rows(kwargs, active, n_base)
                block = bridge.blocks[j]
                if split and j == L - 1:
                    m = hi - lo - 1
                    win[:] = [0, m]
                    handle = block.attn.register_forward_hook(_stop_after_attention)
                    try:
                        block(x[:, :m], *window_args(args, lo, hi - 1, width, kv_j),
                              **window_args(kwargs, lo, hi - 1, width, kv_j))
                    except AttentionDone:
                        pass
                    finally:
                        handle.remove()
                    win[:] = [m, m + 1]
                    x, a_lo = x[:, m:], hi - 1
                    self.stats["attn_tokens"] += k * m
                    self.stats["block_calls"] += 1
                else:
                    a_lo = lo
                out = block(x, *window_args(args, a_lo, hi, width, kv_j),
                            **window_args(kwargs, a_lo, hi, width, kv_j))
                x = out[0] if isinstance(out, tuple) else out
                self.stats["block_calls"] += 1
                self.stats["block_tokens"] += k * (hi - a_lo)
        if split:
            last = x[:, -1]
        else:
            last = x[torch.arange(n, device=x.device), b.lengths[rows] - 1 - lo]
        self.stats["unembed_rows"] += n
        return self._unembed(last, full)

    def _forward_fused(self, rows: torch.Tensor, starts: Sequence[int], lo: int, hi: int,
                       points: dict, win: list[int] | None, full: bool, split: bool) -> torch.Tensor:
        """:meth:`_forward_rows` through :class:`FusedGPT2` (rows of one length)."""
        g = RowGroup(rows, list(starts), lo, hi, points, [0, hi - lo] if win is None else win)
        return self._unembed(self._run_groups([g])[0], full)

    def _run_groups(self, groups: list[RowGroup]) -> list[torch.Tensor]:
        """Final residuals ``[n, d]`` at the last position of every group, all groups through
        :class:`FusedGPT2` together: one call per block, rows joining at their start block
        from the base residual, the cached prefix from the base run's keys and values."""
        L, fused = self.n_layers, self._fused
        for j in range(min(g.starts[0] for g in groups), L):
            live = []
            for g in groups:
                k = bisect_right(g.starts, j)
                if k > g.joined:
                    new = self.base_cache[act_name("resid_pre", j)][g.rows[g.joined:k], g.lo:g.hi]
                    g.x, g.joined = (new if g.x is None else torch.cat([g.x, new])), k
                if not k:
                    continue
                g.prefix = None
                if g.lo:
                    keys, values = self._kv[j]
                    act = g.rows[:k]
                    g.prefix = (keys[act, :, :g.lo], values[act, :, :g.lo])
                live.append(g)
            tokens = sum(g.x.shape[0] * g.x.shape[1] for g in live)
            self.stats["block_calls"] += 1
            if j < L - 1:
                fused.packed(j, live)
                self.stats["block_tokens"] += tokens
            else:
                outs = fused.packed_last(j, live)
                self.stats["block_tokens"] += sum(g.x.shape[0] for g in live)
                self.stats["attn_tokens"] += tokens - sum(g.x.shape[0] for g in live)
        self.stats["unembed_rows"] += sum(len(g.rows) for g in groups)
        return outs

    def forward_from(self, start: int, hooks: Sequence = (), skip: int = 0,
                     rows: torch.Tensor | None = None, full: bool = False) -> torch.Tensor:
        """Last-token logits of the base ``rows`` (default all) re-run from block ``start`` with
        ``hooks``, recomputing only positions ``skip:`` up to the longest row (the hooks must
        leave earlier positions unchanged; they see positions ``skip:`` of every row, in one
        call per block); differentiable in whatever the hooks add. Needs a passed re-entry
        check."""
        if not self.early_start or (skip and not self.skip_prefix) or not self._bridge_ok():
            raise RuntimeError("this engine cannot re-enter blocks (its re-entry check failed)")
        rows = torch.arange(len(self.base), device=self.base.input_ids.device) if rows is None else rows
        hooks = list(hooks)
        lengths = self.base.lengths[rows]
        hi = int(lengths.max())
        final = f"blocks.{self.n_layers - 1}."
        # the split runs the final block twice: only for hooks that never fire there
        split = (self.split_final and bool((lengths == hi).all())
                 and not any(str(h[0]).startswith(final) or not str(h[0]).startswith("blocks.") for h in hooks))
        return self._forward_rows(rows, [start] * len(rows), skip, hi, hooks, full=full, split=split)

    def _forward_full(self, rows: torch.Tensor, hooks: list) -> torch.Tensor:
        b = self.base
        self.stats["block_calls"] += self.n_layers
        self.stats["block_tokens"] += len(rows) * int(b.input_ids.shape[1]) * self.n_layers
        self.stats["unembed_rows"] += len(rows)
        return last_token_logits(self.model.bridge, b.input_ids[rows], b.attention_mask[rows],
                                 b.lengths[rows], self._embed_hook(rows) + hooks)

    # ------------------------------------------------------------ variants
    def run(self, variants: Sequence[Variant], desc: str = "patching") -> Float[torch.Tensor, "variant rows"]:
        """The metric for every (variant, base row); rows a variant does not touch get the base
        value. Returns ``[n_variants, n_rows]``."""
        out = self.base_metric.unsqueeze(0).repeat(len(variants), 1)
        b = self.base
        width = int(b.input_ids.shape[1])
        lengths = b.lengths.to(out.device)
        groups: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
        full: list[tuple[int, int, torch.Tensor]] = []  # variants run as whole forwards
        final: list[tuple[int, torch.Tensor]] = []  # variants setting only the final residual
        todo = list(variants)  # what each variant runs as (an MLP output folded forward)
        last = lengths - 1
        for v, var in enumerate(variants):
            if not var:
                continue
            var = tuple(self._last_only(p, last) for p in var)
            first = torch.full((len(b),), width, dtype=torch.long, device=out.device)
            for p in var:  # first patched position of each row (width: untouched)
                pos = torch.where(p.positions.any(1), p.positions.int().argmax(1), width)
                first = torch.minimum(first, pos.to(out.device))
            if self.skip_noops:
                live = torch.zeros(len(b), dtype=torch.bool, device=out.device)
                for p in var:
                    live |= ~self._noop(p).to(out.device)
                self.stats["noop_rows"] += int((~live & (first < lengths)).sum())
                first = torch.where(live, first, width)
            # a patch at padding only changes no real position (causal attention)
            first = torch.where(first < lengths, first, width)
            touched = (first < width).nonzero().squeeze(1)
            if not len(touched):
                continue
            if not (self.early_start and all(_in_block(p) for p in var)):
                todo[v] = var
                full.append((0, v, touched))
                continue
            todo[v] = var = self._folded(var, touched)
            start = min(p.layer for p in var)
            if start == self.n_layers:
                final.append((v, touched))
                continue
            skip = first[touched] if self.skip_prefix else torch.zeros_like(touched)
            key = skip * (width + 1) + lengths[touched]
            for k in key.unique().tolist():
                end, s = k % (width + 1), k // (width + 1)
                groups.setdefault((end, s), []).append((start, v, touched[key == k]))
        self._fill_derived()
        packs = []
        if self.fused:  # groups whose patches the fused blocks can set: packed calls
            ok = {key for key, items in groups.items()
                  if self._fused.supports(p.hook for _, v, _ in items for p in todo[v])}
            packs = list(self._packs({key: groups.pop(key) for key in sorted(ok)}))
        if groups and not self._bridge_ok():  # the bridge's blocks cannot re-enter: whole forwards
            full += [(0, v, r) for items in groups.values() for _, v, r in items]
            groups = {}
        chunks = [("pack", p) for p in packs] + [("chunk", c) for c in self._plan(groups)]
        chunks += [("chunk", (0, width, items, None))
                   for items in _cut(full, max(1, self.max_tokens // max(1, width)))]
        bar = tqdm(chunks, desc=desc, disable=not self.progress or len(chunks) < 4, leave=False)
        with torch.no_grad():
            for kind, task in bar:
                runs = self._run_pack(task, todo) if kind == "pack" else [self._run_chunk(*task[:3], todo, task[3])]
                for v_idx, rows, values in runs:
                    out[v_idx, rows] = values
            if final:
                v_idx, rows, values = self._run_final(final, todo)
                out[v_idx, rows] = values
        return out

    def _last_only(self, p: Patch, last: torch.Tensor) -> Patch:
        """``p`` set at each row's last position only where it sets a final-block activation that
        reaches no other position (its attention or MLP output, ``resid_mid``, its output): the
        metric reads the last position's logits alone, so elsewhere such a patch changes nothing
        (causal attention: no later block reads those positions)."""
        L = self.n_layers
        if p.layer != L - 1 or p.hook not in {act_name(c, L - 1) for c in ("attn_out", "mlp_out", "resid_mid",
                                                                           "resid_post")}:
            return p
        at = torch.zeros_like(p.positions)
        rows = torch.arange(len(at), device=at.device)
        at[rows, last.to(at.device)] = True
        return Patch(p.hook, p.layer, p.positions & (at if p.positions.ndim == 2 else at[..., None]),
                     p.source, p.unit)

    def _packs(self, groups: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]]):
        """Packs of ``(lo, hi, items)`` groups for :meth:`_run_groups`: each ``(end, skip)``
        group exactly (its own span, no padding, no merging), cut to ``pack_tokens`` positions,
        groups put together until a pack holds ``pack_tokens``."""
        pack, size = [], 0
        for (end, skip), items in groups.items():
            P = end - skip
            items = sorted(items, key=lambda t: t[0])
            for part in _cut(items, max(1, self.pack_tokens // P)):
                n = sum(len(r) for *_, r in part) * P
                if pack and size + n > self.pack_tokens:
                    yield pack
                    pack, size = [], 0
                pack.append((skip, end, part))
                size += n
        if pack:
            yield pack

    def _run_pack(self, pack: list[tuple[int, int, list]], todo: Sequence[Variant]):
        """``(v_idx, rows, values)`` of every group of a pack, run together."""
        groups, meta = [], []
        for lo, hi, items in pack:
            rows = torch.cat([r for *_, r in items])
            win = [0, hi - lo]
            points = {h: partial(_setter, parts=ps, win=win) for h, ps in self._parts(items, lo, hi, todo).items()}
            groups.append(RowGroup(rows, [s for s, _, r in items for _ in range(len(r))], lo, hi, points,
                                   win))
            meta.append((torch.cat([torch.full_like(r, v) for _, v, r in items]), rows))
        outs = self._run_groups(groups)
        logits = self._unembed(torch.cat(outs))
        rows = torch.cat([r for _, r in meta])
        values = metric_rows(self.metric, logits, self.base.prompt_idx[rows])
        self.stats["chunks"] += 1
        res, at = [], 0
        for v_idx, r in meta:
            res.append((v_idx, r, values[at: at + len(r)]))
            at += len(r)
        return res

    def _run_final(self, items: list[tuple[int, torch.Tensor]], todo: Sequence[Variant]):
        """Variants that set only the final residual (the final block's MLP output, folded): the
        metric of that residual at each row's last token, where the patch sets it (elsewhere it
        is the base run's)."""
        b, L = self.base, self.n_layers
        rows = torch.cat([r for _, r in items])
        v_idx = torch.cat([torch.full_like(r, v) for v, r in items])
        last = b.lengths[rows] - 1
        at = torch.arange(len(rows), device=rows.device)
        x = self.base_cache[act_name("resid_post", L - 1)][rows, last]
        for v, r in items:
            p = todo[v][0]
            sel = (v_idx == v).nonzero().squeeze(1)
            m = p.positions[r, last[sel]]
            src = self._source(p.source, p.hook, r)[at[: len(r)], last[sel]]
            x[sel] = torch.where(m[:, None], src.to(x.dtype), x[sel])
        self.stats["unembed_rows"] += len(rows)
        return v_idx, rows, metric_rows(self.metric, self._unembed(x), b.prompt_idx[rows])

    def _plan(self, groups: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]]):
        """``(lo, hi, items, split)`` chunks. Groups of (variant, rows) items sharing a last
        position ``end`` and a first changed position ``skip`` are merged, in ``(end, skip)``
        order, where one call computing positions ``min skip : max end`` for all of them costs
        less than separate calls (cost = positions computed + ``merge_tokens`` per block call,
        block by block as rows join at their start layer); then cut to ``max_tokens``. Items are
        sorted by start layer, so the rows active in a block are a prefix of the chunk."""
        if not groups:
            return
        L, C = self.n_layers, self.merge_tokens
        keys = sorted(groups)
        hist = []
        for key in keys:
            h = np.zeros(L)
            for start, _, r in groups[key]:
                h[start] += len(r)
            hist.append(h)

        def cost(a: int, z: int) -> float:
            seg = keys[a:z]
            ends = {e for e, _ in seg}
            if len(ends) > 1 and not self.mix_lengths:
                return float("inf")
            lo, hi = min(s for _, s in seg), max(ends)
            P = hi - lo
            active = np.cumsum(np.sum(hist[a:z], axis=0))
            active = active[active > 0]
            calls = np.ceil(active / max(1, self.max_tokens // P))
            tokens = active * P
            if self.split_final and len(ends) == 1 and P > 1:
                tokens[-1] = active[-1] * (1 + (P - 1) * _ATTN_FRACTION)
                calls[-1] *= 2
            return float((C * calls + tokens).sum())

        window = 48  # longest run of groups one chunk may merge
        best, cut = [0.0] + [float("inf")] * len(keys), [0] * (len(keys) + 1)
        for z in range(1, len(keys) + 1):
            for a in range(max(0, z - window), z):
                c = best[a] + cost(a, z)
                if c < best[z]:
                    best[z], cut[z] = c, a
        segs, z = [], len(keys)
        while z:
            segs.append((cut[z], z))
            z = cut[z]
        for a, z in reversed(segs):
            seg = keys[a:z]
            lo, hi = min(s for _, s in seg), max(e for e, _ in seg)
            split = self.split_final and len({e for e, _ in seg}) == 1
            items = sorted((it for key in seg for it in groups[key]), key=lambda t: t[0])
            for part in _cut(items, max(1, self.max_tokens // (hi - lo))):
                yield lo, hi, part, split

    def _parts(self, items: list[tuple[int, int, torch.Tensor]], lo: int, hi: int,
               variants: Sequence[Variant]) -> dict[str, list]:
        """Setter parts of a chunk, per hook: ``(idx, mask, src)`` with ``idx`` the chunk rows a
        (hook, source) patches (None: all), ``mask`` ``[k, hi - lo]`` (``[k, hi - lo, unit]``
        where a patch picks units) and ``src`` the source's values there."""
        entries: dict[tuple[str, str], dict[int, list]] = {}
        off = 0
        for _, v, r in items:
            for p in variants[v]:
                sel = p.positions[r][:, lo:hi]
                if p.unit is not None:
                    u = torch.zeros(sel.shape + (self._n_units(p.source, p.hook),), dtype=torch.bool,
                                    device=sel.device)
                    u[..., p.unit] = sel
                    sel = u
                d = entries.setdefault((p.hook, p.source), {})
                if off in d:  # two patches of one variant on one (hook, source): one mask
                    prev = d[off][1]
                    if prev.ndim < sel.ndim:
                        prev = prev[..., None].expand_as(sel)
                    elif sel.ndim < prev.ndim:
                        sel = sel[..., None].expand_as(prev)
                    d[off][1] = prev | sel
                else:
                    d[off] = [r, sel]
            off += len(r)
        hooks: dict[str, list] = {}
        for (hook, source), d in entries.items():
            masks = [m for _, m in d.values()]
            units = max(m.shape[2] if m.ndim == 3 else 0 for m in masks)
            if units:
                masks = [m if m.ndim == 3 else m[..., None].expand(-1, -1, units) for m in masks]
            idx = torch.cat([torch.arange(o, o + len(e[0])) for o, e in d.items()])
            src_rows = torch.cat([e[0] for e in d.values()])
            idx = None if len(idx) == off else idx.to(src_rows.device)
            hooks.setdefault(hook, []).append(
                (idx, torch.cat(masks), self._source(source, hook, src_rows, lo, hi)))
        return hooks

    def _run_chunk(self, lo: int, hi: int, items: list[tuple[int, int, torch.Tensor]],
                   variants: Sequence[Variant], split: bool | None):
        rows = torch.cat([r for *_, r in items])
        v_idx = torch.cat([torch.full_like(r, v) for _, v, r in items])
        win = [0, hi - lo]
        hooks = [(h, partial(_setter, parts=ps, win=win))
                 for h, ps in self._parts(items, lo, hi, variants).items()]
        if split is None:  # whole forwards
            logits = self._forward_full(rows, hooks)
        else:
            starts = [s for s, _, r in items for _ in range(len(r))]  # the bridge's blocks
            logits = self._forward_rows(rows, starts, lo, hi, hooks, win, split=split)
        self.stats["chunks"] += 1
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

    def _source(self, name: str, hook: str, rows: torch.Tensor, lo: int = 0,
                hi: int | None = None) -> torch.Tensor:
        """Source ``name``'s ``hook`` for base ``rows`` at positions ``lo:hi``."""
        s = self.sources.get(name) or self._derived.get(name)
        if s is None:
            raise KeyError(f"no source run named {name!r} (have: {', '.join(self.sources)})")
        if hook not in s.acts:
            raise KeyError(f"source {name!r} did not cache {hook!r}")
        acts = s.acts[hook]
        return (acts if lo == 0 and hi is None else acts[:, lo:hi])[s.rows[rows]]


def _cut(items: list[tuple[int, int, torch.Tensor]], size: int):
    """Items ``(start, v, rows)`` in order, cut into lists of at most ``size`` rows."""
    out: list[tuple[int, int, torch.Tensor]] = []
    n = 0
    for start, v, rows in items:
        while len(rows):
            take = rows[: size - n]
            out.append((start, v, take))
            n += len(take)
            rows = rows[len(take):]
            if n >= size:
                yield out
                out, n = [], 0
    if out:
        yield out


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


def patch_by_pos(engine: PatchEngine, components: Sequence[str] = ("resid", "mlp", "attn"),
                 source: str = "clean") -> dict[str, Float[torch.Tensor, "layer pos rows"]]:
    """The named sweeps of several components in one :meth:`PatchEngine.run` (their variants
    share block calls): ``{component: [layer, pos, rows]}``, the numbers each sweep gives alone."""
    masks, L = position_masks(engine.base), engine.n_layers
    variants = [layer_variants(c, range(L), masks, L, 1, source) for c in components]
    vals = engine.run([v for vs in variants for v in vs], desc="patch " + "+".join(components))
    out, at = {}, 0
    for c, vs in zip(components, variants):
        out[c] = vals[at: at + len(vs)].reshape(L, len(masks), -1)
        at += len(vs)
    return out


def clean_source(model: "BiasModel", batch: "TokenBatch", hooks: Iterable[str], rows: torch.Tensor,
                 fwd_hooks: Sequence = ()) -> tuple[ActSource, torch.Tensor]:
    """Cache ``hooks`` on ``batch`` (one forward) as a source; also return last-token logits."""
    cache: dict[str, torch.Tensor] = {}
    keep = [(h, partial(_keep, cache=cache, name=h)) for h in set(hooks)]
    with torch.no_grad():
        last = last_token_logits(model.bridge, batch.input_ids, batch.attention_mask, batch.lengths,
                                 list(fwd_hooks) + keep)
    return ActSource(cache, rows), last
