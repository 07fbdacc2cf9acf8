"""Attribution patching: every site's indirect effect from one forward and one backward pass.

First-order approximation of activation patching (Nanda 2023; Syed et al. 2023, "Attribution
Patching Outperforms Automated Circuit Discovery"; docs/methods/tracing.md):

    IE(site) ≈ (a_source(site) − a_base(site)) · ∂m/∂a (site), evaluated on the base run.

For a token role with several positions the contributions of its positions are summed (the
linearisation of patching them together). Use it to screen; confirm with exact patching
(:func:`biaslens.locate.effects.agreement` reports how well they agree).
"""

from __future__ import annotations

from contextlib import contextmanager
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from jaxtyping import Float

from biaslens.hooks import act_name
from biaslens.locate.effects import EffectMap
from biaslens.locate.noise import noise_base, prepare, signed_effects
from biaslens.locate.patching import (
    LAYER_HOOKS, ActSource, AttentionDone, Base, FusedGPT2, RowGroup, add_delta, clean_source,
    column_width, last_token_logits, metric_rows, role_masks, take_rows, untap, window_args,
)
from biaslens.prompts import ROLES

if TYPE_CHECKING:
    from biaslens.model import BiasModel
    from biaslens.prompts import TokenBatch

__all__ = ["gradient_attribution", "attribution_scores", "role_sums", "attribution_patch",
           "shared_prefix"]


def _grab(act: torch.Tensor, hook: Any, store: dict, name: str) -> torch.Tensor:
    store[name] = act
    return act


def _embed_leaf(act: torch.Tensor, hook: Any, delta: torch.Tensor | None) -> torch.Tensor:
    """Start the autograd graph at the token embeddings (no parameter gradients are needed)."""
    act = act.detach().requires_grad_(True)
    return act if delta is None else act + delta.to(act.dtype)


@contextmanager
def _frozen(model: "BiasModel", fused: FusedGPT2 | None = None):
    """Parameters (the bridge's own copies too; only those ``fused`` reads, where given) out of
    autograd while active: a backward then computes activation gradients only, and the
    forward keeps nothing for weight gradients."""
    pool = model.bridge.parameters() if fused is None else fused.parameters()
    params = [p for p in pool if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def gradient_attribution(
    model: "BiasModel", base: Base, source: ActSource, metric: Callable, hooks: Sequence[str],
) -> tuple[dict[str, Float[torch.Tensor, "rows pos ..."]], torch.Tensor]:
    """``(a_source − a_base) * ∂m/∂a`` elementwise for every hook (not yet summed over the last
    axis), from one forward and one backward pass over the base rows; also the base metric.
    Only the last tokens are unembedded and no parameter gets a gradient."""
    bridge = model.bridge
    store: dict[str, torch.Tensor] = {}
    fwd = [(act_name("embed"), partial(_embed_leaf, delta=base.embed_delta))]
    fwd += [(h, partial(_grab, store=store, name=h)) for h in hooks]
    with torch.enable_grad(), _frozen(model):
        last = last_token_logits(bridge, base.input_ids, base.attention_mask, base.lengths, fwd)
        m = metric_rows(metric, last, base.prompt_idx)
        grads = torch.autograd.grad(m.sum(), [store[h] for h in hooks])
    out = {}
    for h, g in zip(hooks, grads):
        out[h] = (source.acts[h][source.rows] - store[h].detach()) * g
    return out, m.detach()


def shared_prefix(clean: "TokenBatch", base: Base, rows: torch.Tensor) -> int:
    """Leading positions where every base row has exactly its clean row's input (tokens,
    mask, no perturbation): activations there are the same in both runs (causal attention)."""
    width = int(base.input_ids.shape[1])
    if int(clean.input_ids.shape[1]) != width:
        return 0
    same = (base.input_ids == clean.input_ids[rows]) & (base.attention_mask == clean.attention_mask[rows])
    if base.embed_delta is not None:
        same &= (base.embed_delta == 0).all(-1)
    diff = (~same).any(0)
    return int(diff.int().argmax()) if bool(diff.any()) else width


def attribution_scores(
    model: "BiasModel", clean: "TokenBatch", base: Base, metric: Callable, hooks: Sequence[str],
    rows: torch.Tensor | None = None,
) -> tuple[dict[str, Float[torch.Tensor, "rows pos ..."]], torch.Tensor, torch.Tensor]:
    """:func:`gradient_attribution` with the clean run included (base row ``r`` reads clean row
    ``rows[r]``, default ``base.prompt_idx``): ``(scores, base metric, clean last-token logits)``.

    Where the model's blocks run fused (:class:`~biaslens.locate.patching.FusedGPT2`, checked
    against the bridge on the clean rows) and the hooks are residual, attention- or MLP-output
    sites, the leading positions every base row shares with its clean row are run once (in the
    clean run: their activations, hence their scores, are the same in both runs, so their scores
    are exactly 0) and the corrupted forward and its backward cover the rest only, the final
    block with its last position alone in full; the clean logits are then the metric's columns
    only (``-inf`` elsewhere) where it declares them. Else: the clean run, then
    :func:`gradient_attribution`."""
    rows = base.prompt_idx if rows is None else rows
    hooks = list(hooks)
    skip = shared_prefix(clean, base, rows)
    fused = FusedGPT2.build(model.bridge)
    sites = all(h.rsplit(".", 1)[-1] in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out") for h in hooks)
    shortest = min(int(clean.lengths.min()), int(base.lengths.min()))
    if fused is not None and sites and fused.supports(hooks) and skip < shortest:
        got = _fused_attribution(model, fused, clean, base, rows, metric, hooks, skip)
        if got is not None:
            return got
    src, clean_last = clean_source(model, clean, hooks, rows)
    scores, m = gradient_attribution(model, base, src, metric, hooks)
    return scores, m, clean_last


def _by_length(lengths: torch.Tensor, lo: int, x: torch.Tensor) -> list[RowGroup]:
    """Groups of equal-length rows (indices into ``x``), each holding its positions ``lo:length``."""
    groups = []
    for n in lengths.unique().tolist():
        idx = (lengths == n).nonzero().squeeze(1)
        g = RowGroup(idx, [0] * len(idx), lo, int(n), {}, [0, int(n) - lo])
        g.x, g.joined = x[idx, : int(n) - lo], len(idx)
        groups.append(g)
    return groups


def _fused_attribution(model, fused: FusedGPT2, clean: "TokenBatch", base: Base, rows: torch.Tensor,
                       metric: Callable, hooks: list[str], skip: int):
    """:func:`attribution_scores` through ``fused``: one stopped bridge forward for both runs'
    embeddings (and block 0's arguments), the fused final block checked there against the
    bridge's own on two clean rows (else None: the caller runs the bridge), the clean run
    (no gradients; keys and values of the shared prefix kept), the corrupted run over positions
    ``skip:`` on that prefix, one backward. Rows of each length run as one group (no padding
    computed); the final block runs whole at the last position only (keys and values before).
    The clean and base rows go through each block in one call (one pass over its weights, which
    on a CPU costs as much as the matmuls at these few positions): the base rows read the clean
    rows' keys and values of the prefix from that call; the clean rows carry no gradient, and
    the backward computes the matmuls' input gradients at the base rows only. The check runs
    once per bridge."""
    L, n, B = model.n_layers, len(base), len(clean)
    width = int(base.input_ids.shape[1])
    x0, args = _block0_input(model, clean, base)
    check = torch.arange(min(2, B), device=x0.device)
    if model.bridge not in _AGREED:
        if not _fused_agrees(model, fused, x0[check], take_rows(args, check, B + n), clean.lengths[check]):
            return None
        try:
            _AGREED[model.bridge] = True
        except TypeError:  # a bridge that takes no weak reference: checked every time
            pass
    head = _Head(model, metric)
    gc = _by_length(clean.lengths, 0, x0[:B])  # the clean rows: every position, no gradients
    gb = _by_length(base.lengths, skip, x0[B:, skip:])  # the base rows from the shared prefix on
    nc = len(gc)

    def share(groups):  # base rows read their clean row's keys and values before `skip`
        if not skip:
            return
        k0 = gc[0].kv_now[0]
        keys = k0.new_empty((B, k0.shape[1], skip, k0.shape[3]))
        values = torch.empty_like(keys)
        for g in gc:
            keys[g.rows], values[g.rows] = g.kv_now[0][:, :, :skip].detach(), g.kv_now[1][:, :, :skip].detach()
        for g in gb:
            g.prefix = (keys[rows[g.rows]], values[rows[g.rows]])

    clean_acts: dict[str, torch.Tensor] = {}
    entries: dict[str, list] = {h: [] for h in hooks}
    with torch.enable_grad(), _frozen(model, fused):  # both runs in one call per block
        for g in gb:
            g.x = g.x.detach().requires_grad_(True)
        for j in range(L):
            for g in gc:
                g.x = g.x.detach()
            taps: dict = {}
            if j < L - 1:
                fused.packed(j, gc + gb, taps, before_attention=share, frozen=nc)
            else:
                outs = fused.packed_last(j, gc + gb, taps, before_attention=share, frozen=nc)
            for h in hooks:
                if h in taps:
                    ours = _rows_of_groups(taps[h], range(nc))
                    clean_acts[h] = untap(ours, [t.detach() for t, _ in ours], gc + gb, B, width)
                    entries[h] = _rows_of_groups(taps[h], range(nc, nc + len(gb)))
        with torch.no_grad():
            got = torch.cat([g.rows for g in gc])  # the clean rows in group order
            clean_last = head(torch.cat(outs[:nc]).detach())[torch.argsort(got)]
            head_width = head.narrow_width(clean_last)
        order = torch.cat([g.rows for g in gb])
        m = torch.empty(n, device=x0.device)
        vals = metric_rows(metric, head(torch.cat(outs[nc:]), head_width), base.prompt_idx[order])
        flat = [t for h in hooks for t, _ in entries[h]]
        grads = torch.autograd.grad(vals.sum(), flat)
        m[order] = vals.detach()
    out, at = {}, 0
    for h in hooks:
        k = len(entries[h])
        g_full = untap(entries[h], grads[at: at + k], gc + gb, n, width)
        a_full = untap(entries[h], [t.detach() for t, _ in entries[h]], gc + gb, n, width)
        at += k
        out[h] = (clean_acts[h][rows] - a_full) * g_full
    return out, m, clean_last


def _rows_of_groups(entries: list, which) -> list:
    """Tapped ``(tensor, layout)`` entries (see :meth:`FusedGPT2.packed`) cut to the groups
    ``which``; entries left with none dropped."""
    keep = set(which)
    out = []
    for t, layout in entries:
        mine = [e for e in layout if e[0] in keep]
        if mine:
            out.append((t, mine))
    return out


class _Head:
    """Final norm and unembedding of last-token residuals: only the metric's columns
    (``-inf`` elsewhere) where it declares them."""

    def __init__(self, model: "BiasModel", metric: Callable):
        self.bridge, self.metric = model.bridge, metric
        cols = getattr(metric, "columns", None)
        head = model.hf.get_output_embeddings() if cols is not None else None
        ok = head is not None and isinstance(getattr(head, "weight", None), torch.Tensor)
        self.cols, self.head = (cols.to(head.weight.device), head) if ok else (None, None)

    def narrow_width(self, clean_logits: torch.Tensor) -> int | None:
        """The width the metric needs (:func:`~biaslens.locate.patching.column_width`, checked
        on ``clean_logits``, ``-inf`` outside the columns); None: the vocabulary wide."""
        if self.cols is None:
            return None
        idx = torch.arange(clean_logits.shape[0], device=clean_logits.device)
        return column_width(self.metric, clean_logits, self.cols, idx)

    def __call__(self, resid: torch.Tensor, width: int | None = None) -> torch.Tensor:
        h = self.bridge.ln_final(resid)
        if self.cols is None:
            return self.bridge.unembed(h)
        bias = getattr(self.head, "bias", None)
        out = torch.full((h.shape[0], width or int(self.bridge.cfg.d_vocab)), float("-inf"),
                         dtype=h.dtype, device=h.device)
        out[:, self.cols] = torch.nn.functional.linear(
            h, self.head.weight[self.cols].to(h.dtype), None if bias is None else bias[self.cols].to(h.dtype))
        return out


# bridges whose fused final block was seen to give the bridge's own (a property of their
# blocks' code, not of the weights, which the fused blocks read from the bridge on every call)
_AGREED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fused_agrees(model, fused: FusedGPT2, x: torch.Tensor, args: tuple, lengths: torch.Tensor) -> bool:
    """The fused final block gives the bridge's final block's output on ``x`` (with block 0's
    call arguments ``args``: the same for every block of these models, whose blocks are all of
    one class) at real positions, to 1e-5 relative."""
    bridge, width = model.bridge, x.shape[1]
    a, kw = window_args(args[0], 0, width, width, None), window_args(args[1], 0, width, width, None)
    real = torch.arange(width, device=x.device)[None] < lengths[:, None]
    try:
        with torch.no_grad():
            for l in (model.n_layers - 1,):
                ref = bridge.blocks[l](x, *a, **kw)
                ref = ref[0] if isinstance(ref, tuple) else ref
                err = ((fused(l, x, 0, None, {}) - ref).abs().amax(-1) * real).max()
                if not bool(err <= 1e-5 * (float(ref.abs().max()) + 1.0)):
                    return False
    except Exception:  # blocks that cannot be called on their own so
        return False
    return True


def _block0_input(model: "BiasModel", clean: "TokenBatch", base: Base) -> tuple[torch.Tensor, tuple]:
    """The residual stream entering block 0 on the clean rows then the base rows (with their
    embedding perturbation), and block 0's call arguments, from one bridge forward stopped
    there."""
    bridge = model.bridge
    B = len(clean)
    ids = torch.cat([clean.input_ids, base.input_ids])
    mask = torch.cat([clean.attention_mask, base.attention_mask])
    got: dict[str, Any] = {}

    def pre(mod, args, kwargs):
        got["x"] = args[0] if args else kwargs["hidden_states"]
        got["args"] = (args[1:], kwargs)
        raise AttentionDone

    h = bridge.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    fwd = []
    if base.embed_delta is not None:
        delta = torch.cat([base.embed_delta.new_zeros((B,) + base.embed_delta.shape[1:]), base.embed_delta])
        fwd = [(act_name("embed"), partial(add_delta, delta=delta))]
    try:
        with torch.no_grad(), bridge.hooks(fwd_hooks=fwd):
            bridge(ids, attention_mask=mask)
    except AttentionDone:
        pass
    finally:
        h.remove()
    return got["x"], got["args"]


def role_sums(scores: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """``scores [rows, pos]`` summed over each role's positions → ``[roles, rows]``."""
    return torch.stack([(scores * m).sum(1) for m in masks.values()])


def attribution_patch(
    model: "BiasModel",
    prompts: Sequence[Any],
    components: Sequence[str] = ("resid", "mlp", "attn"),
    n_samples: int = 10,
    noise_scale: float = 3.0,
    metric: Callable | None = None,
    seed: int = 0,
    roles: Sequence[str] = ROLES,
    normalize: bool = True,
    n_boot: int = 1000,
    batch_size: int = 64,
) -> EffectMap:
    """The noise-tracing map of :func:`~biaslens.locate.noise.trace_noise` by attribution
    patching (same corruption, same seed, same normalisation; method ``"attribution"``)."""
    batch, metric, metric_name = prepare(model, prompts, metric)
    L, B, roles = model.n_layers, len(batch), list(roles)
    base, nu = noise_base(model, batch, n_samples, noise_scale, seed)
    hooks = [act_name(LAYER_HOOKS[c], l) for c in components for l in range(L)]
    src, clean_last = clean_source(model, batch, hooks, base.prompt_idx)
    clean = metric_rows(metric, clean_last, torch.arange(B, device=clean_last.device))
    masks = role_masks(batch, base, roles)
    attr = torch.zeros((len(components), L, len(roles), len(base)), device=clean.device)
    corrupted = torch.zeros(len(base), device=clean.device)
    for s in range(0, len(base), batch_size):
        rows = torch.arange(s, min(len(base), s + batch_size), device=clean.device)
        sub = Base(base.input_ids[rows], base.attention_mask[rows], base.lengths[rows],
                   base.prompt_idx[rows], base.embed_delta[rows])
        scores, corrupted[rows] = gradient_attribution(
            model, sub, ActSource(src.acts, src.rows[rows]), metric, hooks)
        sub_masks = {r: m[rows] for r, m in masks.items()}
        for ci, c in enumerate(components):
            for l in range(L):
                attr[ci, l, :, rows] = role_sums(scores[act_name(LAYER_HOOKS[c], l)].sum(-1), sub_masks)
    corrupted = corrupted.reshape(B, n_samples)
    present = torch.stack([batch.role_mask(r).any(1) for r in roles])
    per_prompt, meta = {}, {}
    for ci, c in enumerate(components):
        restored = corrupted.reshape(-1)[None, None] + attr[ci]  # first-order restored metric
        vals = restored.reshape(L, len(roles), B, n_samples)
        per_prompt[c], meta = signed_effects(vals, clean, corrupted, present, normalize)
    meta.update({"noise_std": nu, "noise_scale": noise_scale, "n_samples": n_samples, "seed": seed})
    return EffectMap.from_per_prompt(
        per_prompt, model=model.name, method="attribution", metric=metric_name, layers=range(L),
        roles=roles, n_boot=n_boot, seed=seed, meta=meta)
