"""biaslens.locate: where does a model store a bias? (causal mediation, docs/methods/tracing.md)

- :func:`trace_noise` — ROME-style noise corruption of the subject and restoration per site.
- :func:`trace_swap` — Vig-style counterfactual subject swap: TE, NDE, NIE for layers, heads and
  MLP neurons.
- :func:`attribution_patch` — the first-order map from one forward and one backward pass.
- :func:`locate` — one entry point for the three (used by the CLI and the demo).
- :class:`EffectMap` / :class:`Site` — the result every editor consumes (``top_sites``,
  ``best_role``, ``best_layers``, ``save``/``load``).
- :mod:`biaslens.locate.patching` — the batched exact-patching engine behind all of them.

Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from biaslens._lazy import lazy_getattr

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    from biaslens.model import BiasModel


# EffectMap needs numpy: import it on first use so `biaslens --help` stays fast.
__getattr__ = lazy_getattr(__name__, {n: "biaslens.locate.effects" for n in ("EffectMap", "Site", "agreement")})

METHODS = ("noise", "swap", "attribution")

__all__ = ["EffectMap", "Site", "agreement", "locate", "trace_noise", "trace_swap",
           "attribution_patch", "default_prompts", "default_swap", "METHODS"]


def trace_noise(*args, **kwargs) -> EffectMap:
    from biaslens.locate.noise import trace_noise as f

    return f(*args, **kwargs)


def trace_swap(*args, **kwargs) -> EffectMap:
    from biaslens.locate.swap import trace_swap as f

    return f(*args, **kwargs)


def attribution_patch(*args, **kwargs) -> EffectMap:
    from biaslens.locate.attribution import attribution_patch as f

    return f(*args, **kwargs)


for _f, _m in ((trace_noise, "noise"), (trace_swap, "swap"), (attribution_patch, "attribution")):
    _f.__doc__ = f"See :func:`biaslens.locate.{_m}.{_f.__name__}`."


def default_prompts(model: "BiasModel | str", max_prompts: int | None = 120, seed: int = 0) -> list[Any]:
    """The model's default tracing prompts (:meth:`biaslens.defaults.Defaults.trace_prompts`):
    edit occupations × edit templates, a seeded sample of ``max_prompts`` that keeps every
    occupation equally represented (``None``: all of them)."""
    from biaslens.defaults import defaults_for

    return defaults_for(model).trace_prompts(max_prompts, seed)


def default_swap(prompt: Any) -> str:
    """Swap the occupation for the gendered word of the other side of its stereotype:
    "man" for a female-leaning occupation, "woman" for a male-leaning one (Vig et al.)."""
    meta = getattr(prompt, "meta", {}) or {}
    rate = getattr(prompt, "female_rate", None) if hasattr(prompt, "female_rate") else meta.get("female_rate")
    return "woman" if rate is not None and float(rate) <= 0.5 else "man"


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

    ``method``: ``"noise"`` (default), ``"swap"`` (``swaps`` default :func:`default_swap`) or
    ``"attribution"``. ``prompts`` default to :func:`default_prompts` (``max_prompts`` of them).
    Extra keyword arguments go to the method (e.g. ``n_samples``, ``noise_scale``, ``top_n``).
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
    if window > model.n_layers:
        raise BiasLensError(f"window {window} is larger than the model's {model.n_layers} layers")
    prompts = list(prompts) if prompts is not None else default_prompts(model, max_prompts, seed)
    if method == "noise":
        effects = trace_noise(model, prompts, components=components, window=window, metric=metric,
                              seed=seed, **kwargs)
    elif method == "attribution":
        effects = attribution_patch(model, prompts, components=components, metric=metric, seed=seed,
                                    **kwargs)
    else:
        effects = trace_swap(model, prompts, swaps or default_swap, components=components,
                             metric=metric, seed=seed, **kwargs)
    return effects.stamp(model)  # the map names its model (checked by the editors)
