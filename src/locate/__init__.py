"""biaslens.locate: where does a model store a bias? (causal mediation, docs/methods/tracing.md)

- :func:`locate` — one entry point for the three tracers (used by the CLI and the demo).
- :class:`EffectMap` / :class:`Site` — the result every editor consumes (``top_sites``,
  ``best_role``, ``best_layers``, ``save``/``load``); :func:`agreement` compares two maps.
- :func:`default_prompts`, :func:`default_swap` — the default tracing prompts and subject swap.

The tracers themselves are imported from their modules, with their full signatures:

- :func:`biaslens.locate.noise.trace_noise` — ROME-style noise corruption of the subject and
  restoration per site.
- :func:`biaslens.locate.swap.trace_swap` — Vig-style counterfactual subject swap: TE, NDE, NIE for
  layers, heads and MLP neurons.
- :func:`biaslens.locate.attribution.attribution_patch` — the first-order map from one forward and
  one backward pass.
- :mod:`biaslens.locate.patching` — the batched exact-patching engine behind all of them.

They import torch when imported (through the patching engine), so this package does not re-export
them: importing ``biaslens.locate`` (and ``biaslens --help``) imports numpy but not torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from biaslens.locate.effects import EffectMap, Site, agreement
from biaslens.prompts import female_rate

if TYPE_CHECKING:
    from biaslens.model import BiasModel

METHODS = ("noise", "swap", "attribution")

__all__ = ["EffectMap", "Site", "agreement", "locate", "default_prompts", "default_swap", "METHODS"]


def default_prompts(model: "BiasModel | str", max_prompts: int | None = 120, seed: int = 0) -> list[Any]:
    """The model's default tracing prompts (:meth:`biaslens.defaults.Defaults.trace_prompts`):
    edit occupations × edit templates, a seeded sample of ``max_prompts`` that keeps every
    occupation equally represented (``None``: all of them)."""
    from biaslens.defaults import defaults_for

    return defaults_for(model).trace_prompts(max_prompts, seed)


def default_swap(prompt: Any) -> str:
    """Swap the occupation for the gendered word of the other side of its stereotype:
    "man" for a female-leaning occupation, "woman" for a male-leaning one (Vig et al.)."""
    rate = female_rate(prompt)
    return "woman" if rate <= 0.5 else "man"  # NaN (no rate): "man"


def locate(
    model: "BiasModel | str",
    prompts: Sequence[Any] | None = None,
    method: str = "noise",
    components: Sequence[str] = ("resid", "mlp", "attn"),
    window: int = 1,
    metric: Callable | None = None,
    swaps: Any = None,
    seed: int = 0,
    max_prompts: int | None = 120,
    **kwargs: Any,
) -> EffectMap:
    """Trace where ``model`` carries the bias measured by ``metric`` on ``prompts``.

    ``method``: ``"noise"`` (:func:`biaslens.locate.noise.trace_noise`, the default), ``"swap"``
    (:func:`biaslens.locate.swap.trace_swap`; ``swaps`` default :func:`default_swap`) or
    ``"attribution"`` (:func:`biaslens.locate.attribution.attribution_patch`). ``prompts`` default
    to :func:`default_prompts` (``max_prompts`` of them). Extra keyword arguments go to the method (e.g. ``n_samples``, ``noise_scale``, ``top_n``).
    """
    from biaslens.errors import BiasLensError

    if method not in METHODS:
        raise BiasLensError(f"unknown method '{method}' (use one of: {', '.join(METHODS)})")
    bad = [c for c in components if c not in ("resid", "mlp", "attn")]
    if bad or not components:
        raise BiasLensError(f"unknown components {bad} (use any of: resid, mlp, attn)")
    if window < 1:
        raise BiasLensError(f"window must be at least 1 layer (got {window})")
    if isinstance(model, str):
        import biaslens

        model = biaslens.load(model)
    from biaslens.model import require_single_model

    require_single_model(model, "locating")
    if window > model.n_layers:
        raise BiasLensError(f"window {window} is larger than the model's {model.n_layers} layers")
    prompts = list(prompts) if prompts is not None else default_prompts(model, max_prompts, seed)
    if method == "noise":
        from biaslens.locate.noise import trace_noise

        effects = trace_noise(model, prompts, components=components, window=window, metric=metric,
                              seed=seed, **kwargs)
    elif method == "attribution":
        from biaslens.locate.attribution import attribution_patch

        effects = attribution_patch(model, prompts, components=components, metric=metric, seed=seed,
                                    **kwargs)
    else:
        from biaslens.locate.swap import trace_swap

        effects = trace_swap(model, prompts, swaps or default_swap, components=components,
                             metric=metric, seed=seed, **kwargs)
    return effects.stamp(model)  # the map names its model (checked by the editors)
