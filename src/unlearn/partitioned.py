"""PCGU: partitioned contrastive gradient unlearning (Yu et al. 2023; decoder form: Dige et al. 2024).

For a batch of contrast pairs (docs/methods/unlearning.md):

1. ``g_a = ∇θ mean_i s(advantaged_i)`` and ``g_d = ∇θ mean_i s(disadvantaged_i)``, where ``s`` is
   the mean token log-likelihood of the sentence (``form="sentence"``, Dige et al.) or the
   log-probability of the target word after the prefix (``form="token"``, the causal-LM analogue of
   Yu et al.'s masked token; a multi-token word is scored by teacher forcing, summed).
2. Every 2-D weight is partitioned into units: rows (default, "input aggregation": one output
   unit's input weights, whatever the storage layout — see :meth:`ArchSpec.output_dim`) or
   columns; every 1-D parameter is one unit.
3. Per unit ``c_u = cos(g_a[u], g_d[u])`` from three per-unit scalars (dot product and both squared
   norms), so the distributed version only all-reduces those scalars.
4. The ``k`` units with the lowest cosine (most contrastive) are re-selected every batch and only
   they take a plain SGD step: ``θ_u ← θ_u − η g_a[u]`` (``variant="advantaged"``),
   ``θ_u ← θ_u + η g_d[u]`` (``"disadvantaged"``) or ``θ_u ← θ_u − η (g_a[u] − g_d[u])``
   (``"both"``).

Choices the papers leave open: the cosine follows ``torch.nn.functional.cosine_similarity``
(each norm clamped at 1e-8, so a unit whose gradient is zero on one side has cosine 0), a unit
with no gradient on either side is never preferred; the model runs in eval mode (no dropout) so a step is deterministic; batches
are pairs shuffled with ``seed`` and reshuffled every epoch; the last batch of an epoch may be
smaller.

Strength and retention (:func:`pcgu`, one process): k, the learning rate and the number of
steps are chosen on the validation split like every unlearning method here
(:mod:`biaslens.unlearn.select`), and the gradient of the definitional keep term
(:class:`~biaslens.unlearn.common.KeepTerm`) joins the selected units' step: the most
contrastive units are the ones that write gender itself, so without it definitional gender goes
with the stereotype. The FSDP engine (:mod:`biaslens.unlearn.distributed`) runs the papers'
update alone.
"""

from __future__ import annotations

import os

import hashlib
import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from biaslens.errors import BiasLensError
from biaslens.model import logits_where
from biaslens.unlearn.select import validation_for
from biaslens.unlearn.common import Best, Guard, keep_term, minibatches, seed_all
from biaslens.unlearn.hparams import PCGU_VARIANTS, PCGUHparams, resolve_hparams

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    import torch
    from jaxtyping import Bool, Float, Int

    from biaslens.arch import ArchSpec
    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel
    from biaslens.unlearn.pairs import ContrastPair

__all__ = ["PARTITIONS", "VARIANTS", "FORMS", "OPTIMIZERS", "EPS", "PCGUConfig", "UnitLayout",
           "unit_layout", "unit_stats", "unit_cosines", "select_units", "step_units", "ScoredBatch",
           "encode_side", "side_scores", "check_pairs", "pair_batches", "n_steps", "Engine",
           "GRAD_TOKENS", "side_grads", "pcgu_step", "GROUPS", "pcgu_params", "plain_module", "progress_bar",
           "DEFAULT_KS", "DEFAULT_LRS", "DEFAULT_VARIANTS", "resolve_form", "pcgu", "run"]

PARTITIONS = ("rows", "columns")
VARIANTS = PCGU_VARIANTS
FORMS = ("sentence", "token")
OPTIMIZERS = ("sgd",)
EPS = 1e-8
GRAD_TOKENS = 1024  # tokens per forward and backward of one side of a batch (side_grads)


@dataclass(frozen=True)
class PCGUConfig:
    """The hyperparameters of a PCGU run (recorded in the delta's manifest)."""

    k: int = 10_000
    lr: float = 1e-5
    batch_size: int = 16
    epochs: int = 1
    max_steps: int | None = None
    partition: str = "rows"
    variant: str = "advantaged"
    form: str = "sentence"
    optimizer: str = "sgd"
    seed: int = 0

    def __post_init__(self):
        for name, value, allowed in (("partition", self.partition, PARTITIONS),
                                     ("variant", self.variant, VARIANTS), ("form", self.form, FORMS),
                                     ("optimizer", self.optimizer, OPTIMIZERS)):
            if value not in allowed:
                raise BiasLensError(f"PCGU {name} must be one of {', '.join(allowed)}, not {value!r}"
                                    + (" (PCGU uses plain SGD)" if name == "optimizer" else ""))
        for name in ("k", "batch_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise BiasLensError(f"PCGU {name} must be a positive integer, not {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise BiasLensError(f"max_steps must be a positive integer or None, not {self.max_steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BiasLensError(f"the learning rate must be a positive number, not {self.lr!r}")


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class UnitLayout:
    """Where each parameter's units sit in the global unit vector.

    ``dims[i]`` is the dimension of parameter ``names[i]`` that indexes its units (``None`` for a
    1-D parameter: the whole tensor is one unit); ``offsets[i]`` is its first global unit id.
    """

    names: tuple[str, ...]
    dims: tuple[int | None, ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.names else 0

    def counts(self, selected: "Int[torch.Tensor, 'k']") -> dict[str, int]:
        """How many selected units fall in each parameter (only parameters with some)."""
        import torch

        edges = torch.tensor(list(self.offsets) + [self.total])
        n = torch.bucketize(selected, edges[1:], right=True).bincount(minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, n.tolist()) if c}


def unit_layout(arch: "ArchSpec", shapes: dict[str, Sequence[int]], partition: str = "rows") -> UnitLayout:
    """The units of the named parameters: rows or columns of 2-D weights, whole 1-D tensors."""
    if partition not in PARTITIONS:
        raise BiasLensError(f"partition must be one of {', '.join(PARTITIONS)}, not {partition!r}")
    names, dims, sizes, offsets, at = [], [], [], [], 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            dim, size = None, 1
        elif len(shape) == 2:
            out = arch.output_dim(name)
            dim = out if partition == "rows" else 1 - out
            size = int(shape[dim])
        else:
            raise BiasLensError(f"PCGU partitions 1-D and 2-D parameters; {name} is {len(shape)}-D")
        names.append(name), dims.append(dim), sizes.append(size), offsets.append(at)
        at += size
    return UnitLayout(tuple(names), tuple(dims), tuple(sizes), tuple(offsets))


def unit_stats(
    ga: "Float[torch.Tensor, '...']", gd: "Float[torch.Tensor, '...']", dim: int | None, n_units: int,
    row_offset: int = 0,
) -> "Float[torch.Tensor, '3 n_units']":
    """Per-unit ``[g_a·g_d, |g_a|², |g_d|²]`` of one parameter.

    ``ga``/``gd`` may be a dim-0 shard starting at row ``row_offset`` (FSDP): units along dim 0
    are then filled in only for the local rows (zeros elsewhere), units along dim 1 and 1-D
    parameters get partial sums — in both cases the sum over shards is the full statistic.
    """
    import torch

    ga, gd = ga.float(), gd.float()
    if dim is None:
        return torch.stack([torch.vdot(ga.flatten(), gd.flatten()), ga.square().sum(),
                            gd.square().sum()])[:, None]
    part = torch.stack([(ga * gd).sum(1 - dim), ga.square().sum(1 - dim), gd.square().sum(1 - dim)])
    if dim == 1:
        return part
    out = torch.zeros((3, n_units), dtype=part.dtype, device=part.device)
    out[:, row_offset: row_offset + part.shape[1]] = part
    return out


def unit_cosines(stats: "Float[torch.Tensor, '3 n_units']") -> "Float[torch.Tensor, 'n_units']":
    """``cos(g_a[u], g_d[u])`` from the per-unit statistics; units without any gradient → +inf."""
    import torch

    dot, na, nd = stats.double()
    cos = dot / (na.sqrt().clamp_min(EPS) * nd.sqrt().clamp_min(EPS))
    return torch.where((na == 0) & (nd == 0), torch.full_like(cos, math.inf), cos)


def select_units(cos: "Float[torch.Tensor, 'n_units']", k: int) -> "Int[torch.Tensor, 'k']":
    """Global ids of the ``k`` lowest-cosine units, ascending (ties: the lower id first)."""
    import torch

    k = min(int(k), cos.numel())
    order = torch.argsort(cos, stable=True)
    return order[:k].sort().values


def _direction(ga, gd, variant: str):
    if variant == "advantaged":
        return ga
    if variant == "disadvantaged":
        return -gd
    return ga - gd


def step_units(params: Sequence["torch.Tensor"], grads_a, grads_d, layout: UnitLayout,
               selected: "Int[torch.Tensor, 'k']", lr: float, variant: str,
               row_offsets: Sequence[int] | None = None, grads_keep=None) -> None:
    """``θ_u ← θ_u − lr · (direction[u] + keep[u])`` for the selected units only (in place, local
    shards); ``grads_keep`` (optional) is the gradient of the definitional keep term."""
    import torch

    mask = torch.zeros(layout.total, dtype=torch.bool)
    mask[selected.cpu()] = True
    row_offsets = row_offsets or [0] * len(params)
    with torch.no_grad():
        for i, (p, ga, gd) in enumerate(zip(params, grads_a, grads_d)):
            off, n, dim = layout.offsets[i], layout.sizes[i], layout.dims[i]
            m = mask[off: off + n].to(p.device)
            if not m.any() or p.numel() == 0:
                continue
            d = _direction(ga, gd, variant)
            if grads_keep is not None:
                d = d + grads_keep[i]
            if dim is None:
                p.sub_(d, alpha=lr)
            elif dim == 0:
                rows = m[row_offsets[i]: row_offsets[i] + p.shape[0]]
                p.addcmul_(d, rows[:, None].to(p.dtype), value=-lr)
            else:
                p.addcmul_(d, m[None, :].to(p.dtype), value=-lr)


# ----------------------------------------------------------------------------- scoring


@dataclass
class ScoredBatch:
    """Token ids of one side of some pairs; ``score[i, t]``: token ``t`` of row ``i`` counts in the
    score; ``mean``: the score is the mean over those tokens (sentence form), else their sum."""

    input_ids: "Int[torch.Tensor, 'batch pos']"
    attention_mask: "Int[torch.Tensor, 'batch pos']"
    score: "Bool[torch.Tensor, 'batch pos']"
    mean: bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, start: int, stop: int) -> "ScoredBatch":
        """Rows ``start:stop``, cut to their longest row (right padding: the logits of the kept
        positions do not depend on the padding after them)."""
        width = int(self.attention_mask[start:stop].sum(1).max())
        return ScoredBatch(self.input_ids[start:stop, :width], self.attention_mask[start:stop, :width],
                           self.score[start:stop, :width], self.mean)


def encode_side(model: "BiasModel", pairs: Sequence["ContrastPair"], side: str, form: str) -> ScoredBatch:
    """One side (``"adv"``/``"dis"``) of ``pairs`` as a right-padded :class:`ScoredBatch`."""
    import torch

    tok = model.tokenizer
    rows, marks = [], []
    for p in pairs:
        if form == "sentence":
            ids = model.tokenize([p.advantaged if side == "adv" else p.disadvantaged])[0]
            mark = [False] + [True] * (len(ids) - 1)
        else:
            head = model.tokenize([p.prefix])[0]
            target = model.continuation_ids(p.prefix, p.target_adv if side == "adv" else p.target_dis)
            ids, mark = head + target, [False] * len(head) + [True] * len(target)
        rows.append(ids)
        marks.append(mark)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    score = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, marks)):
        ids[i, : len(r)], attn[i, : len(r)], score[i, : len(r)] = torch.tensor(r), 1, torch.tensor(m)
    dev = model.device
    return ScoredBatch(ids.to(dev), attn.to(dev), score.to(dev), form == "sentence")


def side_scores(module: "torch.nn.Module", batch: ScoredBatch) -> "Float[torch.Tensor, 'batch']":
    """``s`` per row: mean (sentence) or summed (token) log-likelihood of the scored tokens, from
    a Hugging Face causal LM ``module`` (position ``t`` predicts token ``t + 1``)."""
    import torch

    logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    nxt = batch.input_ids[:, 1:, None]
    tok = torch.gather(logits, 2, nxt)[..., 0].float() - torch.logsumexp(logits.float(), dim=-1)
    m = batch.score[:, 1:].float()
    s = (tok * m).sum(1)
    return s / m.sum(1).clamp(min=1.0) if batch.mean else s


def check_pairs(pairs: Sequence["ContrastPair"], form: str) -> list["ContrastPair"]:
    """The pairs as a list, or a clear error when they cannot be used in ``form``."""
    pairs = list(pairs)
    if not pairs:
        raise BiasLensError("PCGU needs at least one contrast pair; the pair source is empty")
    if form == "token":
        bad = [i for i, p in enumerate(pairs) if not p.has_token_form]
        if bad:
            raise BiasLensError(
                f"{len(bad)} of {len(pairs)} pairs have no prefix/target words (first: #{bad[0]}), so "
                "form='token' cannot score them; use form='sentence' or pairs that differ in one word")
    return pairs


def pair_batches(n_pairs: int, batch_size: int, epochs: int, seed: int,
                 max_steps: int | None = None) -> Iterator[tuple[int, list[int]]]:
    """``(epoch, pair indices)`` per step: shuffled with ``seed``, reshuffled every epoch."""
    rng, order, step = random.Random(seed), list(range(n_pairs)), 0
    for epoch in range(epochs):
        rng.shuffle(order)
        for s in range(0, n_pairs, batch_size):
            if max_steps is not None and step >= max_steps:
                return
            yield epoch, order[s: s + batch_size]
            step += 1


def n_steps(n_pairs: int, cfg: PCGUConfig) -> int:
    total = math.ceil(n_pairs / cfg.batch_size) * cfg.epochs
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


# ----------------------------------------------------------------------------- one step


class Engine:
    """How this process runs PCGU: one process over whole tensors. The FSDP engine
    (:class:`biaslens.unlearn.distributed.FSDPEngine`) holds dim-0 shards and all-reduces."""

    method = "pcgu"
    world, rank = 1, 0
    #: tokens per forward and backward of a side (:func:`side_grads`); None: a side's rows at once
    grad_tokens: int | None = GRAD_TOKENS

    def prepare(self, model: "BiasModel", names: Sequence[str]) -> tuple[Any, list["torch.Tensor"]]:
        """The module to differentiate and the trained parameters (in ``names`` order)."""
        module = plain_module(model)
        named = dict(module.named_parameters())
        return module, [named[n] for n in names]

    def split(self, idx: list[int]) -> tuple[list[int], float]:
        """This process's pairs of a batch and each one's weight (the gradient is the batch mean)."""
        return idx, 1.0 / len(idx)

    def finish(self, model: "BiasModel", names: Sequence[str], params: Sequence["torch.Tensor"]) -> None:
        """Put the trained weights into ``model`` (here they already are ``model.params``)."""

    def local(self, t: "torch.Tensor") -> "torch.Tensor":
        return t

    def row_offset(self, t: "torch.Tensor") -> int:
        return 0

    def all_reduce(self, t: "torch.Tensor") -> "torch.Tensor":
        return t

    def info(self) -> dict[str, Any]:
        return {}


def side_grads(module, params: Sequence["torch.Tensor"], batch: ScoredBatch,
               weights: "Float[torch.Tensor, 'batch']",
               max_tokens: int | None = GRAD_TOKENS) -> tuple[list["torch.Tensor"], "torch.Tensor"]:
    """Gradients of ``Σ_i weights_i · s_i`` for ``params`` (taken from ``.grad``, which is left
    empty) and the detached scores.

    A batch of more than ``max_tokens`` (rows × padded width) runs as parts of whole rows of at
    most that many tokens each (at least one row), one forward and backward per part, the
    gradients summed in ``.grad``: the memory of the activations, and of the vocabulary-wide
    logits the scores need, is that of one part whatever the batch size. The sum is the same as
    one backward over the batch, up to the order of the additions. A batch within
    ``max_tokens`` (or with ``max_tokens=None``) runs as one part.
    """
    import torch

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    for p in params:
        p.grad = None
    n, width = batch.input_ids.shape
    if max_tokens is None or n * width <= max_tokens:
        parts = [None]
    else:
        per = max(1, max_tokens // width)
        parts = [(a, min(a + per, n)) for a in range(0, n, per)]
    scores = []
    for part in parts:
        b, w = (batch, weights) if part is None else (batch.rows(*part), weights[part[0]: part[1]])
        s = side_scores(module, b)
        (s * w).sum().backward()
        scores.append(s.detach())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # unused: 0
    for p in params:
        p.grad = None
    return grads, torch.cat(scores)


def pcgu_step(module, params: Sequence["torch.Tensor"], layout: UnitLayout, adv: ScoredBatch,
              dis: ScoredBatch, weights: "Float[torch.Tensor, 'batch']", cfg: PCGUConfig,
              engine: Engine | None = None, keep: Any = None) -> dict[str, Any]:
    """One PCGU update on one batch; returns its history record.

    ``weights`` scales each pair's score (``1/batch`` in one process) so the summed gradient over
    processes is the batch mean. ``params`` are in ``layout`` order. ``keep`` (one process only):
    a :class:`~biaslens.unlearn.common.KeepTerm` whose gradient joins the selected units' step
    (the units are still chosen by the contrast cosine alone).
    """
    import torch

    engine = engine or Engine()
    grads_a, s_a = side_grads(module, params, adv, weights, engine.grad_tokens)
    grads_d, s_d = side_grads(module, params, dis, weights, engine.grad_tokens)
    local_a = [engine.local(g) for g in grads_a]
    local_d = [engine.local(g) for g in grads_d]
    offsets = [engine.row_offset(p) for p in params]
    stats = torch.cat([unit_stats(ga, gd, dim, n, off) for ga, gd, dim, n, off
                       in zip(local_a, local_d, layout.dims, layout.sizes, offsets)], dim=1)
    gap = torch.stack([((s_a - s_d) * (weights != 0)).sum(), (weights != 0).sum().float()])
    stats, gap = engine.all_reduce(stats), engine.all_reduce(gap)
    cos = unit_cosines(stats)
    selected = select_units(cos, cfg.k)
    grads_keep, keep_value = None, None
    if keep is not None:
        for p in params:
            p.grad = None
        value = keep.loss(lambda ids, attention_mask=None, keep=None: logits_where(
            lambda **kw: module(input_ids=ids, attention_mask=attention_mask, **kw).logits, keep))
        value.backward()
        grads_keep = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        keep_value = float(value.detach())
    step_units([engine.local(p.data) for p in params], local_a, local_d, layout, selected, cfg.lr,
               cfg.variant, offsets, grads_keep)
    chosen = cos[selected]
    return {
        "loss_gap": float(gap[0] / gap[1].clamp(min=1)),
        "n_selected": int(selected.numel()),
        "cos_min": float(chosen.min()),
        "cos_max": float(chosen.max()),
        "units": layout.counts(selected),
        "units_sha1": hashlib.sha1(selected.cpu().numpy().tobytes()).hexdigest(),
        **({"keep": keep_value} if keep is not None else {}),
    }


# ----------------------------------------------------------------------------- parameters


GROUPS = ("blocks", "mlp", "attn")


def _named_group(model: "BiasModel", group: str) -> list[str]:
    """Parameters of every layer's block (``"blocks"``: no embeddings, no final norm), MLP
    projections (``"mlp"``) or attention projections (``"attn"``)."""
    if group not in GROUPS:
        raise BiasLensError(f"params must be parameter names or one of {', '.join(GROUPS)}, not {group!r}")
    component = "resid" if group == "blocks" else group
    prefixes = tuple(m + "." for layer in range(model.n_layers)
                     for m in model.arch.component_modules(component, layer))
    return [n for n, p in model.params.items() if n.startswith(prefixes) and p.dim() in (1, 2)]


def pcgu_params(model: "BiasModel", params: Sequence[str] | str | None = None, effect_map: "EffectMap | str | os.PathLike | None" = None,
                n_sites: int = 5) -> list[str]:
    """The parameters PCGU may update: ``params`` (names, or a group: ``"blocks"``, ``"mlp"``,
    ``"attn"``), else every 1-D and 2-D parameter;
    with ``effect_map``, only those of the modules its ``n_sites`` top sites name (MLP in/out
    projections for an ``mlp`` site, q/k/v/out for ``attn``, the whole block for ``resid``)."""
    if isinstance(params, str):
        names = _named_group(model, params)
    elif params is not None:
        names = list(params)
        unknown = [n for n in names if n not in model.params]
        if unknown:
            raise BiasLensError(f"no parameter {unknown[0]!r} in {model.spec} ({len(unknown)} unknown); "
                                f"names look like {next(iter(model.params))!r}")
    else:
        names = [n for n, p in model.params.items() if p.dim() in (1, 2)]
    if effect_map is not None:
        from biaslens.locate.effects import as_effect_map

        sites = as_effect_map(effect_map).top_sites(k=n_sites)
        prefixes = tuple(sorted({m + "." for s in sites
                                 for m in model.arch.component_modules(s.component, s.layer)}))
        names = [n for n in names if n.startswith(prefixes)]
        where = ", ".join(f"{s.component}@{s.layer}" for s in sites)
        if not names:
            raise BiasLensError(f"the effect map's top sites ({where}) name no parameter PCGU may update; "
                                "pass more sites or other params")
    if not names:
        raise BiasLensError("no parameters to update; pass params=None or existing names")
    return names


def plain_module(model: "BiasModel", copy: bool = False) -> "torch.nn.Module":
    """See :meth:`biaslens.model.BiasModel.plain_module` (kept here for existing callers)."""
    return model.plain_module(copy=copy)


class _Trainable:
    """Only ``names`` require grad while the context is open."""

    def __init__(self, model: "BiasModel", names: Sequence[str]):
        self.model, self.names = model, set(names)

    def __enter__(self):
        self.before = {n: p.requires_grad for n, p in self.model.params.items()}
        for n, p in self.model.params.items():
            p.requires_grad_(n in self.names)
        return self

    def __exit__(self, *exc):
        for n, p in self.model.params.items():
            p.requires_grad_(self.before[n])
            p.grad = None


def progress_bar(it, total: int, show: bool, desc: str):
    if not show:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="step")


# ----------------------------------------------------------------------------- the method


#: the grid PCGU's strength is chosen from by default (k units, SGD learning rate); steps are
#: the checkpoints, every ``eval_every`` steps
DEFAULT_KS = (600,)
DEFAULT_LRS = (3e-3, 1e-2)
#: the update variants tried by default (:func:`step_units`): the papers' step on the advantaged
#: side, and the step on the gap between the sides
DEFAULT_VARIANTS = ("advantaged", "both")


def resolve_form(pairs: Sequence["ContrastPair"], form: str) -> str:
    """``"auto"``: the token form (Yu et al.'s masked word: only the differing word is scored)
    when every pair has it, else the sentence form (Dige et al.)."""
    if form != "auto":
        return form
    return "token" if pairs and all(p.has_token_form for p in pairs) else "sentence"


def pcgu(
    model: "BiasModel",
    pairs: Sequence["ContrastPair"],
    *,
    k: int | None = None,
    lr: float | None = None,
    ks: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    batch_size: int = 16,
    epochs: int = 3,
    max_steps: int | None = None,
    partition: str = "rows",
    variant: str | None = None,
    variants: Sequence[str] | None = None,
    form: str = "auto",
    params: Sequence[str] | str | None = "blocks",
    effect_map: "EffectMap | str | os.PathLike | None" = None,
    optimizer: str = "sgd",
    seed: int = 0,
    progress: bool = True,
    n_sites: int = 5,
    val_prompts: Sequence[Any] | None = None,
    eval_every: int = 20,
    ppl_texts: Sequence[str] | None = None,
    ppl_bound: float = 1.1,
    bounds: Any = None,
    validation: Any = "auto",
    keep_prompts: Sequence[Any] | None = None,
    keep_weight: float = 30.0,
    patience: int = 2,
    hparams: "PCGUHparams | dict[str, Any] | str | None" = None,
) -> "WeightDelta":
    """Unlearn the advantaged side of ``pairs`` with PCGU (Yu et al. 2023, Alg. 1; Dige et al. 2024).

    Leaves ``model`` updated and returns the :class:`~biaslens.delta.WeightDelta`;
    ``delta.info["history"]`` has one record per step of the chosen run (``loss_gap`` = mean
    s_a − s_d on the batch before the step, ``n_selected``, the selected units per parameter and a
    hash of their ids). Refuses (and undoes) an update that makes a weight NaN or inf.

    Strength: ``k``, ``lr`` and ``variant`` fix one setting, ``variants`` × ``ks`` × ``lrs`` a
    grid (default :data:`DEFAULT_VARIANTS` × :data:`DEFAULT_KS` × :data:`DEFAULT_LRS`; without
    validation the first of each: the papers' ``"advantaged"`` step); every run is checked every ``eval_every`` steps on
    ``validation`` (``"auto"``: the model's validation split, :mod:`biaslens.unlearn.select`, with
    ``val_prompts`` / ``ppl_texts`` replacing its prompts / perplexity text, ``bounds`` or
    perplexity up at most ``ppl_bound`` − 1; a :class:`~biaslens.unlearn.select.Validation`; or
    None: one run, kept as it ends) and the checkpoint with the lowest validation contrast within
    the bounds is kept (``delta.info["selection"]``); a run stops once ``patience`` checks in a
    row break a bound. Plain SGD has no step-size adaptation, so PCGU's defaults before this
    selection (k = 10,000, lr = 1e-5) moved the organism's contrast by 0%.

    ``params="blocks"`` (default: the transformer blocks' parameters), ``"mlp"``, ``"attn"``,
    names, or None (every 1-D and 2-D parameter, as the papers do). With tied embeddings the most
    contrastive units of all parameters are the unembedding rows of the two target words
    themselves (cosine ≈ −1), so every step shifts *all* prompts towards one word; on the organism
    that raised the gap. An ``effect_map`` restricts to the modules of its ``n_sites`` top sites.

    ``keep_weight`` β: the gradient of the definitional keep term
    (:class:`~biaslens.unlearn.common.KeepTerm`) joins each selected unit's step (0 = the papers'
    update). ``form="auto"``: the token form when every pair has it (:func:`resolve_form`).

    ``hparams``: a :class:`~biaslens.unlearn.hparams.PCGUHparams` (or its dict, or a JSON file)
    holding the keyword hyperparameters above; the delta records ``hparams.to_dict()`` with the
    chosen setting on top.
    """
    import time

    from biaslens.model import require_single_model

    require_single_model(model, "PCGU")
    hpar = resolve_hparams(PCGUHparams, hparams, pcgu, locals())
    (k, lr, ks, lrs, batch_size, epochs, max_steps, partition, variant, variants, form, params, optimizer, seed,
     n_sites, eval_every, ppl_bound, keep_weight, patience) = (
        hpar.k, hpar.lr, hpar.ks, hpar.lrs, hpar.batch_size, hpar.epochs, hpar.max_steps, hpar.partition,
        hpar.variant, hpar.variants, hpar.form, hpar.params, hpar.optimizer, hpar.seed, hpar.n_sites, hpar.eval_every,
        hpar.ppl_bound, hpar.keep_weight, hpar.patience)
    pairs = list(pairs)
    form = resolve_form(pairs, form)
    if eval_every < 1:
        raise BiasLensError(f"eval_every must be a positive number of steps, not {eval_every!r}")
    val = validation_for(model, validation, val_prompts, ppl_texts, bounds, ppl_bound)
    # without validation nothing can be chosen: one run (the grid's first values unless given)
    grid_k = [k] if k is not None and ks is None else list(ks if ks is not None else DEFAULT_KS)
    grid_lr = [lr] if lr is not None and lrs is None else list(lrs if lrs is not None else DEFAULT_LRS)
    grid_v = [variant] if variant is not None and variants is None else list(
        variants if variants is not None else DEFAULT_VARIANTS)
    if val is None:
        grid_k = grid_k if ks is not None else grid_k[:1]
        grid_lr = grid_lr if lrs is not None else grid_lr[:1]
        grid_v = grid_v if variants is not None else grid_v[:1]
    settings = [(vv, kk, rate) for vv in grid_v for kk in grid_k for rate in grid_lr]
    cfgs = [PCGUConfig(kk, rate, batch_size, epochs, max_steps, partition, vv, form, optimizer, seed)
            for vv, kk, rate in settings]  # every setting checked before any work
    if val is None and len(cfgs) > 1:
        raise BiasLensError("a variant / k / learning-rate grid needs validation to choose from it; pass one "
                            "variant, k and lr or validation='auto'")
    check_pairs(pairs, form)
    names = pcgu_params(model, params, effect_map, n_sites)
    keep = keep_term(model, keep_prompts, keep_weight, seed)
    original = model.snapshot(names)
    best, runs, delta, t0 = Best(), [], None, time.perf_counter()
    for cfg in cfgs:
        model.restore(original)
        guard = None
        if val is not None:
            setting = {"k": cfg.k, "lr": cfg.lr, **({"variant": cfg.variant} if len(grid_v) > 1 else {})}
            guard = (Guard(model, names, val, setting=setting, patience=patience, best=best), int(eval_every))
        if keep is not None:
            keep.stream = minibatches(list(range(len(keep.prompts))), keep.batch_size, seed_all(seed))
        delta = run(model, pairs, cfg, Engine(), params=names, progress=progress, guard=guard, keep=keep)
        runs.append({"variant": cfg.variant, "k": cfg.k, "lr": cfg.lr, "history": delta.info["history"],
                     **({"validation": guard[0].info()} if guard is not None else {})})
    if val is None:
        delta.hparams = {**hpar.to_dict(), **delta.hparams}
        return delta
    model.restore(original if best.state is None else best.state)
    bad = model.check_finite(names)
    if bad:
        model.restore(original)
        raise BiasLensError(f"PCGU made {bad[0]} non-finite (learning rate too large?); the model was restored")
    at = next((i for i, r in enumerate(runs) if all(r[x] == v for x, v in best.run.items())), 0)
    chosen_run, cfg = runs[at], cfgs[at]  # one run per setting, in order
    step = int(best.point.setting.get("step", 0)) if best.state is not None else 0
    info = {**{k_: v for k_, v in delta.info.items() if k_ not in ("history", "validation", "seconds")},
            "history": chosen_run["history"][:step], "runs": [{k_: v for k_, v in r.items() if k_ != "history"}
                                                          for r in runs],
            "chosen": best.point.as_dict(), "chosen_run": dict(best.run),
            "stopped": (chosen_run.get("validation") or {}).get("stopped", "max_steps"),
            "validation": chosen_run.get("validation"), "selection": val.info(best.point),
            "seconds": time.perf_counter() - t0,
            "keep_weight": keep_weight if keep is not None else 0.0,
            "n_keep_prompts": len(keep.prompts) if keep is not None else 0, "grid": [list(x) for x in settings]}
    hp = {**hpar.to_dict(), **asdict(cfg), "grid": [list(x) for x in settings],
          "keep_weight": info["keep_weight"], "patience": patience, "eval_every": eval_every}
    return model.delta_since(original, method="pcgu", hparams=hp, info=info)


def run(model: "BiasModel", pairs: Sequence["ContrastPair"], cfg: PCGUConfig, engine: Engine, *,
        params: Sequence[str] | None = None, effect_map: "EffectMap | str | os.PathLike | None" = None, n_sites: int = 5,
        progress: bool = True, guard: tuple[Any, int] | None = None, keep: Any = None) -> "WeightDelta":
    """The PCGU loop of :func:`pcgu` on any :class:`Engine` (one process, or FSDP); ``guard`` is
    ``(biaslens.unlearn.common.Guard, eval_every)`` for early stopping and ``keep`` a
    :class:`~biaslens.unlearn.common.KeepTerm` (both one process only)."""
    import time

    import torch

    pairs = check_pairs(pairs, cfg.form)
    names = pcgu_params(model, params, effect_map, n_sites)
    layout = unit_layout(model.arch, {n: tuple(model.params[n].shape) for n in names}, cfg.partition)
    snap = model.snapshot(names)
    torch.manual_seed(cfg.seed)
    history, t0 = [], time.perf_counter()
    steps = pair_batches(len(pairs), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_steps)
    bar = progress_bar(steps, n_steps(len(pairs), cfg), progress and engine.rank == 0, engine.method)
    stopper, every = guard if guard is not None else (None, 0)
    if (stopper is not None or keep is not None) and engine.world > 1:
        raise BiasLensError("early stopping and the keep term run in one process; the FSDP engine takes neither")
    if stopper is not None:
        stopper.names = list(names)
        stopper.start()
    with _Trainable(model, names):
        module, plist = engine.prepare(model, names)
        for n, p in module.named_parameters():
            p.requires_grad_(n in layout.names)
        for step, (epoch, idx) in enumerate(bar):
            mine, w = engine.split(idx)
            chunk = [pairs[i] for i in mine]
            adv, dis = encode_side(model, chunk, "adv", cfg.form), encode_side(model, chunk, "dis", cfg.form)
            weights = torch.full((len(chunk),), w, device=model.device)
            rec = pcgu_step(module, plist, layout, adv, dis, weights, cfg, engine, keep)
            history.append({"step": step, "epoch": epoch, **rec})
            if stopper is not None and (step + 1) % every == 0 and not stopper.check(step + 1):
                break
        engine.finish(model, names, plist)
    if stopper is not None:
        if history and len(history) % every:
            stopper.check(len(history))
        stopper.finish(snap)
    bad = model.check_finite(names)
    if bad:
        model.restore(snap)
        raise BiasLensError(f"PCGU made {bad[0]} non-finite (lr={cfg.lr} too large?); the model was restored")
    info = {"history": history, "n_pairs": len(pairs), "n_units": layout.total, "params": names,
            "seconds": time.perf_counter() - t0, "n_sites": n_sites if effect_map is not None else None,
            **engine.info(), **({"validation": stopper.info()} if stopper is not None else {})}
    return model.delta_since(snap, method=engine.method, hparams=asdict(cfg), info=info)
