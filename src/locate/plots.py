"""Plotly figures of effect maps: layers × roles heatmaps, head heatmaps, per-layer lines.

Every function returns a ``plotly.graph_objects.Figure`` (shown inline in Jupyter);
:func:`write_html` puts several figures into one standalone HTML file (plotly.js inlined, so it
opens offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from biaslens.locate.effects import EffectMap

__all__ = ["heatmap_figure", "head_heatmap_figure", "layer_line_figure", "effect_figures",
           "write_html"]

_TITLES = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


def _title(component: str) -> str:
    base, _, rest = component.partition("_")
    return _TITLES.get(base, base) + (f" ({rest.replace('_', ' ')})" if rest else "")


def _subtitle(em: "EffectMap") -> str:
    what = {"noise": "indirect effect / total effect (noise restoration)",
            "attribution": "attribution-patching estimate of IE / TE",
            "swap": "natural indirect effect of a subject swap"}.get(em.method, em.method)
    return f"{em.model} · {what} · metric {em.metric} · {em.n_prompts} prompts"


def heatmap_figure(effect_map: "EffectMap", components: Sequence[str] | None = None) -> "go.Figure":
    """One panel per component: layers (y) × token roles (x); hover shows layer, role, effect and
    its bootstrap CI. A shared diverging colour scale centred on 0."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    em = effect_map
    comps = list(components or em.effects)
    fig = make_subplots(rows=1, cols=len(comps), subplot_titles=[_title(c) for c in comps],
                        shared_yaxes=True, horizontal_spacing=0.04)
    finite = np.concatenate([em.effects[c][np.isfinite(em.effects[c])] for c in comps] or [np.zeros(1)])
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    for i, c in enumerate(comps, start=1):
        z = em.effects[c]
        custom = np.stack([em.ci_low[c], em.ci_high[c]], axis=-1)
        fig.add_trace(go.Heatmap(
            z=z, x=em.roles, y=[str(layer) for layer in em.layers], customdata=custom,
            zmin=-bound, zmax=bound, colorscale="RdBu_r", showscale=(i == len(comps)),
            hovertemplate=("layer %{y} · role %{x}<br>effect %{z:.3f}<br>"
                           "95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra>" + c + "</extra>"),
            colorbar=dict(title="effect")), row=1, col=i)
        fig.update_xaxes(title_text="token role", tickangle=-40, row=1, col=i)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_layout(title=_subtitle(em), height=320 + 18 * len(em.layers), width=300 * len(comps) + 120)
    return fig


def head_heatmap_figure(effect_map: "EffectMap") -> "go.Figure":
    """Attention heads: layers × heads heatmap of the head effects (with CI on hover)."""
    import plotly.graph_objects as go

    h = effect_map.heads
    if not h:
        raise ValueError("this effect map has no head effects (run a swap trace with heads=True)")
    z = np.asarray(h["effects"], dtype=float)
    custom = np.stack([np.asarray(h["ci_low"], float), np.asarray(h["ci_high"], float)], axis=-1)
    bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(i) for i in range(z.shape[1])], y=[str(layer) for layer in effect_map.layers],
        customdata=custom, zmin=-bound, zmax=bound, colorscale="RdBu_r",
        hovertemplate="layer %{y} · head %{x}<br>effect %{z:.4f}<br>"
                      "95% CI [%{customdata[0]:.4f}, %{customdata[1]:.4f}]<extra></extra>"))
    fig.update_layout(title=f"attention heads at role '{h.get('role')}' · {_subtitle(effect_map)}",
                      xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
                      height=320 + 18 * len(effect_map.layers))
    return fig


def layer_line_figure(effect_map: "EffectMap", role: str | None = None,
                      components: Sequence[str] | None = None) -> "go.Figure":
    """Effect per layer at one role (default: each component's best role), with CI bands."""
    import plotly.graph_objects as go

    em = effect_map
    fig = go.Figure()
    for c in components or [c for c in em.effects if not c.endswith("_nde")]:
        r = role or em.best_role(c)
        j = em.roles.index(r)
        x = list(em.layers)
        fig.add_trace(go.Scatter(
            x=x + x[::-1], y=list(em.ci_high[c][:, j]) + list(em.ci_low[c][::-1, j]), fill="toself",
            opacity=0.2, line=dict(width=0), showlegend=False, hoverinfo="skip", name=f"{c} CI"))
        fig.add_trace(go.Scatter(x=x, y=em.effects[c][:, j], mode="lines+markers", name=f"{c} @ {r}",
                                 hovertemplate="layer %{x}<br>effect %{y:.3f}<extra>" + c + "</extra>"))
    fig.update_layout(title=f"effect per layer · {_subtitle(em)}", xaxis_title="layer",
                      yaxis_title="effect", height=420)
    return fig


def effect_figures(effect_map: "EffectMap") -> list["go.Figure"]:
    """The standard figures of a map: heatmaps, per-layer lines, and heads when present."""
    figs = [heatmap_figure(effect_map), layer_line_figure(effect_map)]
    if effect_map.heads:
        figs.append(head_heatmap_figure(effect_map))
    return figs


def write_html(figs: "go.Figure | Sequence[go.Figure]", path: str | Path, title: str = "biaslens") -> Path:
    """Write figures into one standalone HTML file (plotly.js included once, inline), through
    :func:`biaslens.report.write_figures`, the one HTML writer."""
    from biaslens.report import write_figures

    return write_figures(figs, path, title=title)
