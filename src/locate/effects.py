"""The effect map: causal effects indexed by component × layer × token role, with bootstrap CIs.

An :class:`EffectMap` is what every locating method returns and what the editing and unlearning
methods consume (``top_sites``, ``best_role``, ``best_layers``). Per-prompt values are kept so a
map can be re-aggregated or re-bootstrapped; a role absent from a prompt (e.g. ``subject_middle``
for a one-token subject) is NaN there and left out of that role's mean.

JSON layout (``effects.json``)::

    {"model", "method", "metric", "n_prompts", "layers": [..], "roles": [..],
     "effects": {component: [[value per role] per layer]}, "ci_low": {...}, "ci_high": {...},
     "per_prompt": {component: [[[value per role] per layer] per prompt]},
     "heads": {...} | null, "neurons": [...] | null, "meta": {...},
     "identity": {"weight_hash", "n_layers"} | null}

NaN is written as ``null``. ``identity`` names the traced model (:meth:`EffectMap.stamp`); an
editor refuses a map of another layer count and warns on other weights
(:meth:`EffectMap.check_model`). Maps without it (older files) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from biaslens.errors import DataFormatError
from biaslens.jsonio import clean
from biaslens.stats import bootstrap_mean_ci, pearson, quiet_nan_warnings

__all__ = ["as_effect_map", "MAIN_COMPONENTS", "Site", "EffectMap", "agreement"]


MAIN_COMPONENTS = ("resid", "mlp", "attn")


@dataclass(frozen=True)
class Site:
    """One place in the model: ``component`` ("resid", "mlp", "attn") at ``layer`` and ``role``."""

    component: str
    layer: int
    role: str
    effect: float
    ci_low: float
    ci_high: float


def _array(x: Any) -> np.ndarray:
    return np.array(
        [np.nan if v is None else v for v in np.ravel(np.array(x, dtype=object))], dtype=np.float64
    ).reshape(np.shape(np.array(x, dtype=object)))


@dataclass
class EffectMap:
    """Effects of restoring/swapping each site, averaged over prompts.

    ``effects[c]``, ``ci_low[c]``, ``ci_high[c]``: ``[n_layers, n_roles]``;
    ``per_prompt[c]``: ``[n_prompts, n_layers, n_roles]`` (NaN where a role is absent).
    ``heads``: optional ``{"role", "effects" [L, H], "ci_low", "ci_high", ...}``;
    ``neurons``: optional list of ``{"layer", "neuron", "role", "effect", "ci_low", "ci_high", ...}``
    ranked by effect; ``meta``: anything else (total effect, noise level, seeds, agreement);
    ``identity``: the traced model's ``{"weight_hash", "n_layers"}`` (None when unknown).
    """

    model: str
    method: str
    metric: str
    n_prompts: int
    layers: list[int]
    roles: list[str]
    effects: dict[str, np.ndarray]
    ci_low: dict[str, np.ndarray]
    ci_high: dict[str, np.ndarray]
    per_prompt: dict[str, np.ndarray] = field(default_factory=dict)
    heads: dict[str, Any] | None = None
    neurons: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] | None = None

    # ----------------------------------------------------------- building
    @classmethod
    def from_per_prompt(
        cls,
        per_prompt: dict[str, np.ndarray],
        *,
        model: str,
        method: str,
        metric: str,
        layers: Sequence[int],
        roles: Sequence[str],
        n_boot: int = 1000,
        seed: int = 0,
        **extra: Any,
    ) -> "EffectMap":
        """Average ``per_prompt`` values over prompts with bootstrap CIs (seeded)."""
        eff, lo, hi = {}, {}, {}
        n = 0
        for c, v in per_prompt.items():
            v = np.asarray(v, dtype=np.float64)
            n = v.shape[0]
            eff[c], lo[c], hi[c] = bootstrap_mean_ci(v, n_boot=n_boot, seed=seed)
        return cls(model=model, method=method, metric=metric, n_prompts=n, layers=list(layers),
                   roles=list(roles), effects=eff, ci_low=lo, ci_high=hi,
                   per_prompt={c: np.asarray(v, dtype=np.float64) for c, v in per_prompt.items()},
                   **extra)

    @property
    def components(self) -> list[str]:
        return list(self.effects)

    # ----------------------------------------------------------- identity
    def stamp(self, model: Any) -> "EffectMap":
        """Record which model this map was traced on (its weight hash and layer count)."""
        self.identity = {"weight_hash": model.weight_hash(), "n_layers": int(model.n_layers)}
        return self

    def check_model(self, model: Any, source: str = "the effect map") -> str | None:
        """Whether this map fits ``model``: raises :class:`DataFormatError` when it was traced on
        a model with another layer count; returns a one-line warning when on other weights
        (e.g. a map made before an edit), else None. A map without identity passes."""
        ident = self.identity or {}
        n = ident.get("n_layers")
        if n is not None and int(n) != int(model.n_layers):
            raise DataFormatError(
                f"{source} was traced on a model with {n} layers, but {model.spec} has "
                f"{model.n_layers}; run `biaslens locate` on this model")
        h = ident.get("weight_hash")
        if h and h != model.weight_hash():
            return (f"{source} was traced on other weights (sha256 {str(h)[:12]}...) than "
                    f"{model.spec}'s; its sites may not fit: trace this model to be sure")
        return None

    # ------------------------------------------------------------ queries
    def top_sites(
        self, k: int = 5, component: str | Sequence[str] | None = None,
        roles: str | Sequence[str] | None = None,
    ) -> list[Site]:
        """The ``k`` sites with the largest effect (NaN sites skipped), best first."""
        comps = self._components(component)
        roles = [roles] if isinstance(roles, str) else list(roles or self.roles)
        unknown = [r for r in roles if r not in self.roles]
        if unknown:
            raise ValueError(f"unknown roles {unknown} (this map has: {', '.join(self.roles)})")
        sites = []
        for c in comps:
            e, lo, hi = self.effects[c], self.ci_low[c], self.ci_high[c]
            for li, layer in enumerate(self.layers):
                for r in roles:
                    ri = self.roles.index(r)
                    if np.isfinite(e[li, ri]):
                        sites.append(Site(c, int(layer), r, float(e[li, ri]), float(lo[li, ri]),
                                          float(hi[li, ri])))
        sites.sort(key=lambda s: s.effect, reverse=True)
        return sites[:k]

    def best_role(self, component: str = "mlp") -> str:
        """The role whose best layer has the largest effect for ``component``."""
        e = self.effects[self._components(component)[0]]
        with quiet_nan_warnings():
            per_role = np.nanmax(np.where(np.isfinite(e), e, -np.inf), axis=0)
        return self.roles[int(np.argmax(per_role))]

    def role_maxima(self, component: str = "mlp", roles: Sequence[str] | None = None,
                    below: int | None = None) -> dict[str, float]:
        """Each role's largest finite effect over the layers (those ``< below`` when given), for
        ``roles`` (default every role of the map; roles the map lacks, or with no finite effect
        there, are left out)."""
        e = np.asarray(self.effects[self._components(component)[0]], dtype=float)
        keep = [i for i, l in enumerate(self.layers) if below is None or int(l) < below]
        out: dict[str, float] = {}
        for r in (self.roles if roles is None else roles):
            if r not in self.roles or not keep:
                continue
            col = e[keep, self.roles.index(r)]
            col = col[np.isfinite(col)]
            if col.size:
                out[r] = float(col.max())
        return out

    def effect_at(self, component: str, layer: int, role: str) -> float:
        """The effect of ``component`` at one ``layer`` and ``role``."""
        return float(self.effects[self._components(component)[0]][list(self.layers).index(int(layer)),
                                                                   self.roles.index(role)])

    def best_layers(self, component: str = "mlp", role: str | None = None, k: int = 2,
                    candidates: Sequence[int] | None = None) -> list[int]:
        """The ``k`` layers (among ``candidates``, default all) with the largest effect at
        ``role`` (default: :meth:`best_role`), in increasing layer order (the order an editor
        applies them)."""
        c = self._components(component)[0]
        role = role or self.best_role(c)
        col = self.effects[c][:, self.roles.index(role)]
        col = np.where(np.isfinite(col), col, -np.inf)
        if candidates is not None:
            allowed = {int(l) for l in candidates}
            col = np.where([int(l) in allowed for l in self.layers], col, -np.inf)
            k = min(k, sum(int(l) in allowed for l in self.layers))
        order = np.argsort(-col, kind="stable")[:k]
        return sorted(int(self.layers[i]) for i in order)

    def _components(self, component: str | Sequence[str] | None) -> list[str]:
        """Named components, or by default the layer maps (``resid``/``mlp``/``attn``; derived
        maps such as ``resid_sever_mlp`` only when asked for by name)."""
        main = [c for c in self.effects if c in MAIN_COMPONENTS] or list(self.effects)
        comps = [component] if isinstance(component, str) else list(component or main)
        missing = [c for c in comps if c not in self.effects]
        if missing:
            raise ValueError(f"no component {missing} in this map (it has: {', '.join(self.effects)})")
        return comps

    def table(self, component: str) -> str:
        """A plain-text layers × roles table of one component (for logs and reports)."""
        e = self.effects[component]
        head = "layer " + " ".join(f"{r[:13]:>13}" for r in self.roles)
        rows = [f"{layer:>5} " + " ".join(f"{v:>13.3f}" for v in e[i]) for i, layer in enumerate(self.layers)]
        return "\n".join([f"[{component}]", head, *rows])

    # ---------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return clean({
            "model": self.model, "method": self.method, "metric": self.metric,
            "n_prompts": int(self.n_prompts), "layers": [int(x) for x in self.layers],
            "roles": list(self.roles),
            "effects": {c: v for c, v in self.effects.items()},
            "ci_low": {c: v for c, v in self.ci_low.items()},
            "ci_high": {c: v for c, v in self.ci_high.items()},
            "per_prompt": {c: v for c, v in self.per_prompt.items()},
            "heads": self.heads, "neurons": self.neurons, "meta": self.meta,
            "identity": self.identity,
        })

    def save(self, path: str | Path) -> Path:
        """Write the map as JSON (NaN as null)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from biaslens import jsonio

        jsonio.write(path, self.to_dict(), indent=1)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "EffectMap":
        need = ("model", "method", "metric", "n_prompts", "layers", "roles", "effects", "ci_low", "ci_high")
        missing = [k for k in need if k not in d]
        if missing:
            raise DataFormatError(f"{source}: not an effect map (missing keys: {', '.join(missing)})")
        shape = (len(d["layers"]), len(d["roles"]))
        arrays = {}
        for key in ("effects", "ci_low", "ci_high"):
            arrays[key] = {c: _array(v) for c, v in d[key].items()}
            for c, a in arrays[key].items():
                if a.shape != shape:
                    raise DataFormatError(
                        f"{source}: {key}[{c!r}] has shape {a.shape}, expected {shape} (layers × roles)")
        heads = d.get("heads")
        if heads:
            heads = {k: (_array(v) if isinstance(v, list) else v) for k, v in heads.items()}
        return cls(
            model=d["model"], method=d["method"], metric=d["metric"], n_prompts=int(d["n_prompts"]),
            layers=[int(x) for x in d["layers"]], roles=list(d["roles"]), effects=arrays["effects"],
            ci_low=arrays["ci_low"], ci_high=arrays["ci_high"],
            per_prompt={c: _array(v) for c, v in (d.get("per_prompt") or {}).items()},
            heads=heads, neurons=d.get("neurons"), meta=d.get("meta") or {},
            identity=_identity(d.get("identity"), source),
        )

    @classmethod
    def load(cls, path: str | Path) -> "EffectMap":
        """Read a map written by :meth:`save` (or any JSON with the ``effects.json`` keys)."""
        path = Path(path)
        if path.is_dir():
            path = path / "effects.json"
        if not path.exists():
            raise DataFormatError(f"{path}: no such effect map; run `biaslens locate` first")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(d, dict):
            raise DataFormatError(f"{path}: not an effect map (a JSON object is expected)")
        return cls.from_dict(d, source=str(path))

    def __repr__(self) -> str:
        top = self.top_sites(1)
        best = f", top={top[0].component}@L{top[0].layer}/{top[0].role}={top[0].effect:.3f}" if top else ""
        return (f"EffectMap({self.method}, {self.model!r}, n_prompts={self.n_prompts}, "
                f"components={self.components}{best})")


def _identity(x: Any, source: str) -> dict[str, Any] | None:
    if x is None:
        return None
    ok = isinstance(x, dict) and isinstance(x.get("weight_hash", ""), (str, type(None))) and \
        isinstance(x.get("n_layers", 0), (int, type(None))) and not isinstance(x.get("n_layers"), bool)
    if not ok:
        raise DataFormatError(f'{source}: "identity" must be {{"weight_hash": str, "n_layers": int}}')
    return dict(x)


def as_effect_map(effect_map: "EffectMap | str | Path | None") -> "EffectMap | None":
    """An :class:`EffectMap` as given, loaded from a path to ``effects.json``, or ``None``."""
    if effect_map is None or isinstance(effect_map, EffectMap):
        return effect_map
    if isinstance(effect_map, (str, Path)) or hasattr(effect_map, "__fspath__"):
        return EffectMap.load(effect_map)
    raise TypeError(f"effect_map must be an EffectMap or a path to effects.json, not {type(effect_map).__name__}")


def agreement(a: EffectMap, b: EffectMap, k: int = 5) -> dict[str, dict[str, float]]:
    """How well two maps agree per component: Pearson r over finite cells, and the overlap of
    their top-``k`` sites (e.g. attribution patching against exact patching, docs/methods/tracing.md)."""
    out = {}
    for c in a.effects:
        if c not in b.effects:
            continue
        x, y = a.effects[c].ravel(), b.effects[c].ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        r = pearson(x[ok], y[ok]) if ok.sum() > 2 else float("nan")  # NaN when a side is constant
        ta = {(s.layer, s.role) for s in a.top_sites(k, c)}
        tb = {(s.layer, s.role) for s in b.top_sites(k, c)}
        out[c] = {"pearson": r, f"top{k}_overlap": len(ta & tb) / max(1, min(k, len(ta)))}
    return out
