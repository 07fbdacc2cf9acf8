"""Every debiasing method on both organisms, on the same prompts, splits and bounds (issue 15).

    python scripts/generalise.py [--organisms organism,organism-llama] [--methods LSDM,DAMA,...]
                                 [--out docs/results/generalise.md] [--quick] [--limit N]

For each organism (``biaslens.load("organism")``, a GPT-2; ``biaslens.load("organism-llama")``, a
LLaMA with grouped-query attention and a Metaspace tokenizer) and each method, starting from the
same base weights: run the method with its library defaults on the model's default data
(:mod:`biaslens.defaults`; the same call for both organisms, no per-model setting), measure, undo
it and check the weights hash is back bit for bit. The editors are LSDM (``tune="auto"`` chooses
λ, keep weight and layers on the validation templates), ROME (rank one), CDA (counterfactual
fine-tune), DAMA and LEACE; the unlearning methods are PCGU, task-vector negation, masked-span
ascent and δ-offset, fed ``defaults_for(model).unlearn_data()`` and choosing their strength on
the validation split.

Measured on every row (the base model first), with :func:`biaslens.evaluate.suite`:

* the headline: the stereotype contrast (:mod:`biaslens.evaluate.contrast`) on edit (training)
  occupations × test (held-out) templates: mean |contrast| over templates with its bootstrap CI,
  the relative cut against the base (with a paired CI over templates) and each template's signed
  contrast;
* for information, the same on edit occupations × edit templates and on held-out occupations ×
  test templates;
* definitional accuracy and mean correct-pronoun share on every definitional prompt, factual
  probes, perplexity of the model's general text; the method's wall time; the site and strength
  it chose (from ``delta.info``).

Bounds, never loosened: editors (LSDM's acceptance; DAMA, LEACE, ROME and CDA are shown against
them for comparison) cut ≥ 50%, definitional accuracy down ≤ 1 point, facts down ≤ 1 point,
perplexity up ≤ 2%; unlearning methods cut ≥ 40%, perplexity up ≤ 10%, definitional accuracy down
≤ 2 points. A method that raises is recorded with its error and the run goes on. Writes the
markdown (``--out``) and a JSON record next to it, and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

__all__ = ["BOUNDS", "METHODS", "QUICK_METHODS", "measure", "run_method", "run_organism", "markdown",
           "main"]

ORGANISMS = ("organism", "organism-llama")
#: The issue's bounds (never loosened): the relative cut of the headline contrast, drops of
#: accuracies in fractions (0.01 = 1 point), the relative perplexity rise.
BOUNDS: dict[str, dict[str, float]] = {
    "editor": {"cut": 0.50, "definitional_drop": 0.01, "facts_drop": 0.01, "ppl_rise": 0.02},
    "unlearning": {"cut": 0.40, "definitional_drop": 0.02, "ppl_rise": 0.10},
}
BOUND_LABELS = {"cut": "cut", "definitional_drop": "definitional", "facts_drop": "facts",
                "ppl_rise": "perplexity"}
#: a template "did not move" when its |contrast| fell by less than this fraction
STILL = 0.10


def _relative(text: str) -> str:
    """A traceback with this checkout's paths made relative to it (no machine's paths in the
    record)."""
    return text.replace(str(Path(__file__).resolve().parents[1]) + os.sep, "")


# ------------------------------------------------------------------------------------ methods
# Each runner takes (model, ctx) and returns (scored model, delta, delta owner): the model to
# measure, the reversible WeightDelta, and the model the delta undoes on (δ-offset: its small
# trainable copy). Only public entry points, with their default arguments.
def _editor(fn_name: str) -> Callable:
    def run(model, ctx):
        import biaslens.edit as E

        fn = getattr(E, fn_name)
        delta = fn(model, progress=ctx["progress"])
        return model, delta, model

    run.__doc__ = f"biaslens.edit.{fn_name}(model) with its defaults"
    return run


def _unlearn_data(model, ctx) -> dict[str, Any]:
    """``defaults_for(model).unlearn_data()`` (pairs, forget, retain, val_prompts, ppl_texts)."""
    from biaslens.defaults import defaults_for

    key = ("unlearn_data", id(model))
    if key not in ctx:
        ctx[key] = defaults_for(model).unlearn_data(seed=ctx["seed"])
    return ctx[key]


def _selection_kwargs(fn: Callable, data: dict[str, Any]) -> dict[str, Any]:
    """Nothing when ``fn`` chooses its strength on the model's validation split by default (it
    has a ``validation`` parameter, :mod:`biaslens.unlearn.select`); otherwise the validation
    data the unlearning CLI hands it (``biaslens unlearn``: the model's validation prompts and
    perplexity lines), since there ``None`` means no selection."""
    import inspect

    params = inspect.signature(fn).parameters
    out: dict[str, Any] = {}
    if "validation" in params:
        return out
    for name, key in (("val_prompts", "val_prompts"), ("ppl_texts", "ppl_texts")):
        if name in params and params[name].default is None and data.get(key):
            out[name] = data[key]
    return out


def run_pcgu(model, ctx):
    """PCGU (Yu et al. 2023) on the default contrast pairs."""
    from biaslens.unlearn.partitioned import pcgu

    data = _unlearn_data(model, ctx)
    delta = pcgu(model, data["pairs"], progress=ctx["progress"], **_selection_kwargs(pcgu, data))
    return model, delta, model


def run_task_vector(model, ctx):
    """Task-vector negation (Ilharco et al. 2023; Dige et al. 2024) on the default forget texts."""
    from biaslens.unlearn.task_vector import task_vector_negation

    data = _unlearn_data(model, ctx)
    delta = task_vector_negation(model, data["forget"], progress=ctx["progress"],
                                 **_selection_kwargs(task_vector_negation, data))
    return model, delta, model


def run_masked(model, ctx):
    """Masked-span gradient ascent (Lu et al. 2024) on the default forget texts."""
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    data = _unlearn_data(model, ctx)
    delta = masked_span_ascent(model, data["forget"], progress=ctx["progress"],
                               **_selection_kwargs(masked_span_ascent, data))
    return model, delta, model


def run_offset(model, ctx):
    """δ-offset unlearning (Huang et al. 2024) on the default forget and retain texts, with the
    library's default small pair M_o: the model itself (``biaslens unlearn --method offset``
    without ``--small-model``)."""
    from biaslens.unlearn.offset import offset_unlearn

    data = _unlearn_data(model, ctx)
    om = offset_unlearn(model, model, data["forget"], data["retain"], progress=ctx["progress"],
                        **_selection_kwargs(offset_unlearn, data))
    return om, om.delta, om.offset


#: name -> (kind, runner), in table order
METHODS: dict[str, tuple[str, Callable]] = {
    "LSDM": ("editor", _editor("lsdm")),
    "DAMA": ("editor", _editor("dama")),
    "LEACE": ("editor", _editor("leace")),
    "ROME": ("editor", _editor("rome_rank_one")),
    "CDA": ("editor", _editor("counterfactual_finetune")),
    "PCGU": ("unlearning", run_pcgu),
    "task vector": ("unlearning", run_task_vector),
    "masked-span ascent": ("unlearning", run_masked),
    "δ-offset": ("unlearning", run_offset),
}
QUICK_METHODS = ("LSDM", "LEACE", "task vector")
QUICK_LIMIT = 120
QUICK_PPL_TOKENS = 5000


# ------------------------------------------------------------------------------------ measuring


def measure(model, limit: int | None = None, ppl_tokens: int | None = None) -> dict[str, Any]:
    """The numbers of one row: :func:`biaslens.evaluate.suite` (its headline contrast on edit
    occupations × test templates, the edit-template contrast, definitional accuracy and share on
    every definitional prompt, factual probes, perplexity) and the contrast on held-out
    occupations × test templates. ``limit``: a seeded subset of each prompt set (quick runs);
    ``ppl_tokens``: tokens of general text for perplexity (default: the suite's)."""
    import torch

    from biaslens.defaults import defaults_for
    from biaslens.evaluate import suite
    from biaslens.evaluate.suite import bias_and_contrast

    from biaslens.evaluate.suite import SUITE_PPL_TOKENS

    d = defaults_for(model)
    with torch.no_grad():
        s = suite(model, limit=limit, max_tokens=ppl_tokens or SUITE_PPL_TOKENS)
        _, held = bias_and_contrast(model, d.occupation_prompts("heldout", "test"), limit, gap=False)

    def con(c):
        return {"mean_abs": float(c["mean_abs_contrast"]), "ci": [float(x) for x in c["ci"]["mean_abs_contrast"]],
                "mean": float(c["mean_contrast"]), "n_templates": len(c["per_template"]),
                "n_prompts": int(c.get("n_prompts", 0)),
                "per_template": {t: float(v) for t, v in c["per_template"].items()}}

    out = {
        "defaults": d.organism_name or d.kind,  # whose default data were scored
        "contrast_test": con(s["contrast_test"]),
        "contrast_edit": con(s["contrast_edit"]),
        "contrast_heldout_occ": con(held),
        "definitional": float(s["definitional"]["accuracy"]),
        "definitional_share": float(s["definitional"]["mean_correct_share"]),
        "n_definitional": int(s["definitional"].get("n", 0)),
        "facts": float(s["facts"]["accuracy"]),
        "n_facts": int(s["facts"].get("n", 0)),
        "perplexity": float(s["perplexity"]["perplexity"]),
    }
    bad = [k for k, v in _numbers(out) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite measurement(s): {', '.join(bad)}")
    return out


def _numbers(m: dict[str, Any], prefix: str = ""):
    for k, v in m.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, float):
            yield prefix + k, v


def changes(base: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Cuts of the three contrasts (with a paired bootstrap CI over templates for the
    headline), retention changes, and the headline per template."""
    from biaslens.evaluate.contrast import contrast_change, relative_cut

    def as_result(c):
        return {"mean_abs_contrast": c["mean_abs"], "per_template": c["per_template"],
                "ci": {"mean_abs_contrast": c["ci"]}}

    head = contrast_change(as_result(base["contrast_test"]), as_result(after["contrast_test"]))
    per_template = []
    for row in head["per_template"]:
        b, a = abs(row["before"]), abs(row["after"])
        per_template.append({**row, "cut": relative_cut(b, a),
                             "flipped": row["before"] * row["after"] < 0})
    return {
        "cut": head["cut"], "cut_ci": head["ci"]["cut"],
        "cut_edit": relative_cut(base["contrast_edit"]["mean_abs"], after["contrast_edit"]["mean_abs"]),
        "cut_heldout_occ": relative_cut(base["contrast_heldout_occ"]["mean_abs"],
                                        after["contrast_heldout_occ"]["mean_abs"]),
        "definitional_drop": base["definitional"] - after["definitional"],
        "share_drop": base["definitional_share"] - after["definitional_share"],
        "facts_drop": base["facts"] - after["facts"],
        "ppl_rise": after["perplexity"] / base["perplexity"] - 1.0,
        "per_template": per_template,
    }


def check_bounds(kind: str, ch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pass/fail of each bound of ``kind`` ("editor" | "unlearning") on :func:`changes`."""
    out = {}
    for name, bound in BOUNDS[kind].items():
        value = ch[name]
        if not (isinstance(value, float) and math.isfinite(value)):
            ok = False
        elif name == "cut":
            ok = value >= bound
        else:  # drops and rises: at most the bound (a float's last bit is no failure)
            ok = value <= bound + 1e-12
        out[name] = {"value": value, "bound": bound, "pass": bool(ok)}
    return out


# ------------------------------------------------------------------------------------ choices


def chosen(delta, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The site and strength a method chose, from ``delta.info`` / ``delta.hparams``."""
    info = info if info is not None else (getattr(delta, "info", None) or {})
    hp = getattr(delta, "hparams", None) or {}
    out: dict[str, Any] = {}
    site = info.get("site")
    if isinstance(site, dict):
        out["layers"] = site.get("layers")
        if site.get("role"):
            out["role"] = site["role"]
    method = getattr(delta, "method", "")
    if method == "lsdm":
        for k in ("mom2_weight", "keep_weight"):
            if k in hp:
                out[k] = hp[k]
        tuning = (info.get("diagnostics") or {}).get("tuning") or {}
        if "chosen" in tuning:
            out["within_val_bounds"] = tuning["chosen"].get("within_bounds")
    if "rank" in info:
        out["rank"] = info["rank"]
    if "lambda" in info:
        out["lambda"] = info["lambda"]
    sel = info.get("selection")
    if isinstance(sel, dict) and isinstance(sel.get("chosen"), dict):
        c = sel["chosen"]
        out.update({k: v for k, v in c.items() if k not in _METRIC_KEYS})
        if sel.get("changed") is False:
            out["changed"] = False  # the selection kept the unchanged model
    elif isinstance(info.get("chosen"), dict):  # early stopping (guard): the kept step
        out.update({k: v for k, v in info["chosen"].items() if k in ("step",)})
        if info.get("stopped"):
            out["stopped"] = info["stopped"]
    if method == "offset":
        out["small_model"] = "the model itself (M_o = M)"
    return out


_METRIC_KEYS = {"contrast", "gap", "definitional", "margin", "confident", "ppl", "perplexity", "ok", "why", "facts",
                "facts_accuracy",
                "per_template", "feasible", "failed", "violations", "within_bounds", "violation", "seconds",
                "definitional_accuracy", "definitional_share", "definitional_share_drop",
                "definitional_broken", "facts_lost", "ppl_rise", "keep", "skipped", "rank_used",
                "definitional_female", "definitional_male", "margin_female", "margin_male"}


def sweep_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The validation sweep a method recorded, as ``{"setting", "contrast", "ok", "why"}`` rows
    (LSDM's tuner, DAMA/LEACE's validator, the unlearning selection, the task vector's λ sweep,
    an early-stopping history), whichever the method wrote."""
    src = None
    for path in (("diagnostics", "tuning", "sweep"), ("selection", "sweep"), ("validation", "sweep"),
                 ("sweep",), ("history",)):
        node: Any = info
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, list) and node and isinstance(node[0], dict):
            src = node
            break
    rows = []
    for r in src or []:
        contrast = r.get("contrast", r.get("gap"))
        if not isinstance(contrast, (int, float)):
            continue
        ok = r.get("feasible", r.get("within_bounds", r.get("ok")))
        why = r.get("failed", r.get("violations", r.get("why")))
        setting = {k: v for k, v in r.items() if k not in _METRIC_KEYS and not isinstance(v, (dict, list))
                   or k == "layers"}
        rows.append({"setting": setting, "contrast": float(contrast), "ok": ok,
                     "why": ", ".join(why) if isinstance(why, list) else (why or "")})
    return rows


def validation_base(info: dict[str, Any]) -> float | None:
    """The unchanged model's validation contrast, where the method recorded it."""
    for path in (("diagnostics", "tuning", "base", "contrast"), ("selection", "base", "contrast"),
                 ("validation", "base", "contrast")):
        node: Any = info
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            return float(node)
    sweep = info.get("sweep")
    if isinstance(sweep, list) and sweep and isinstance(sweep[0], dict) and sweep[0].get("lambda") == 0:
        return sweep[0].get("gap")  # the task vector's λ = 0 row
    return None


# ------------------------------------------------------------------------------------ running


def run_method(model, name: str, kind: str, fn: Callable, base: dict[str, Any], ctx: dict[str, Any],
               base_hash: str, snapshot: dict) -> dict[str, Any]:
    """One row: run, time, measure, undo, check the weights hash; an error is recorded."""
    import torch

    torch.manual_seed(ctx["seed"])
    row: dict[str, Any] = {"method": name, "kind": kind, "bounds": kind}
    t0 = time.perf_counter()
    try:
        scored, delta, owner = fn(model, ctx)
    except Exception as exc:  # recorded in the row, the run goes on
        row["seconds"] = time.perf_counter() - t0
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        row["traceback"] = _relative(traceback.format_exc(limit=6))
        if model.weight_hash() != base_hash:
            model.restore(snapshot)
            row["restored_after_error"] = True
        row["undo_exact"] = model.weight_hash() == base_hash
        print(f"[{ctx['organism']}] {name}: raised {row['error']}", file=sys.stderr)
        return row
    row["seconds"] = time.perf_counter() - t0
    info = getattr(delta, "info", None) or {}
    row["chosen"] = chosen(delta, info)
    row["sweep"] = sweep_rows(info)
    row["validation_base"] = validation_base(info)
    row["n_tensors_changed"] = len(delta.names)
    owner_hash = owner.weight_hash(delta.original) if owner is not model else None
    try:
        after = measure(scored, ctx["limit"], ctx["ppl_tokens"])
        if after["defaults"] != base["defaults"]:
            raise ValueError(f"the method's result was scored on the '{after['defaults']}' defaults, "
                             f"the base on '{base['defaults']}'")
        row["measures"] = after
        row["changes"] = changes(base, after)
        row["checks"] = check_bounds(kind, row["changes"])
        row["passes"] = all(c["pass"] for c in row["checks"].values())
    except Exception as exc:
        row["error"] = f"measuring: {type(exc).__name__}: {exc}"
        row["traceback"] = _relative(traceback.format_exc(limit=6))
    finally:
        delta.undo(owner)
    row["undo_exact"] = model.weight_hash() == base_hash and (
        owner_hash is None or owner.weight_hash() == owner_hash)
    if not row["undo_exact"]:  # never let one row's leftovers reach the next
        model.restore(snapshot)
    if "changes" in row:
        c = row["changes"]
        print(f"[{ctx['organism']}] {name}: contrast {base['contrast_test']['mean_abs']:.4f} -> "
              f"{row['measures']['contrast_test']['mean_abs']:.4f} (cut {c['cut']:+.1%}), definitional "
              f"{-c['definitional_drop'] * 100:+.1f} pt, ppl {c['ppl_rise']:+.2%}, {row['seconds']:.0f} s, "
              f"{'passes' if row['passes'] else 'misses'} the {kind} bounds", file=sys.stderr)
    return row


def run_organism(model, methods: list[str], limit: int | None = None, seed: int = 0, progress: bool = False,
                 registry: dict[str, tuple[str, Callable]] | None = None, name: str | None = None,
                 ppl_tokens: int | None = None) -> dict[str, Any]:
    """The base row and one row per method on ``model`` (every method from the same weights).
    ``registry``: name -> (kind, runner), default :data:`METHODS`; ``limit`` and ``ppl_tokens``
    as in :func:`measure`."""
    registry = registry or METHODS
    unknown = [m for m in methods if m not in registry]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(registry)}")
    name = name or getattr(model, "spec", "model")
    t0 = time.perf_counter()
    base_hash = model.weight_hash()
    snapshot = model.snapshot()
    base = measure(model, limit, ppl_tokens)
    ctx = {"seed": seed, "progress": progress, "limit": limit, "ppl_tokens": ppl_tokens, "organism": name}
    rows = [run_method(model, m, registry[m][0], registry[m][1], base, ctx, base_hash, snapshot)
            for m in methods]
    return {"model": name, "family": _family(model), "base_hash": base_hash, "base": base, "rows": rows,
            "seconds": time.perf_counter() - t0}


def _family(model) -> str:
    cfg = getattr(getattr(model, "hf", None), "config", None)
    if cfg is None:
        return ""
    extra = []
    if getattr(cfg, "num_key_value_heads", None) and cfg.num_key_value_heads != getattr(cfg, "num_attention_heads", None):
        extra.append(f"GQA {cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv")
    tok = getattr(model, "tokenizer", None)
    backend = getattr(tok, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else ""
    kind = next((k for k in ("Metaspace", "ByteLevel") if f'"type":"{k}"' in spec.replace(" ", "")), None)
    tok = f"{kind} tokenizer" if kind else type(tok).__name__
    return f"{cfg.model_type}, {getattr(model, 'n_layers', '?')} layers" + "".join(f", {e}" for e in extra) + \
        f", {tok}"


# ------------------------------------------------------------------------------------ writing


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return fmt.format(x)


def _pct(x: Any, signed: bool = False) -> str:
    return _f(None if x is None else 100 * x, "{:+.1f}%" if signed else "{:.1f}%")


def _chosen_text(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    parts = []
    for k, v in c.items():
        if k == "layers" and v is not None:
            parts.append("L" + ",".join(map(str, v)))
        elif k == "role":
            parts.append(f"@{v}")
        elif isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif v is not None:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def _bound_cell(kind: str, check: dict | None, name: str) -> str:
    if name not in BOUNDS[kind]:
        return "—"
    if check is None:
        return "n/a"
    v, b = check["value"], check["bound"]
    if name == "cut":
        txt = f"{_pct(v)} ≥ {b:.0%}"
    elif name == "ppl_rise":
        txt = f"{_pct(v, True)} ≤ {b:.0%}"
    else:
        txt = f"{_f(None if v is None else -100 * v, '{:+.1f}')} pt ≥ −{b * 100:g}"
    return f"{'pass' if check['pass'] else '**FAIL**'} ({txt})"


def main_table(res: dict[str, Any]) -> list[str]:
    b = res["base"]
    lines = [
        "| method | chose | time | mean \\|contrast\\| held-out templates (95% CI) | cut vs base (95% CI) | "
        "edit templates (cut) | held-out occupations (cut) | definitional acc | correct share | facts | "
        "perplexity | undo |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| **base** | | | {_f(b['contrast_test']['mean_abs'])} ({_f(b['contrast_test']['ci'][0])}–"
        f"{_f(b['contrast_test']['ci'][1])}) | | {_f(b['contrast_edit']['mean_abs'])} | "
        f"{_f(b['contrast_heldout_occ']['mean_abs'])} | {_f(b['definitional'])} | "
        f"{_f(b['definitional_share'])} | {_f(b['facts'])} | {_f(b['perplexity'])} | |",
    ]
    for r in res["rows"]:
        label = f"{r['method']} ({r['kind']})" + (" †" if r.get("rerun") is False else "")
        if "changes" not in r:
            lines.append(f"| {label} | raised | {_f(r.get('seconds'), '{:.0f} s')} | "
                         f"`{_oneline(r.get('error', ''))}` | | | | | | | | "
                         f"{'exact' if r.get('undo_exact') else 'NOT exact'} |")
            continue
        a, c = r["measures"], r["changes"]
        lines.append(
            f"| {label} | {_chosen_text(r.get('chosen'))} | {r['seconds']:.0f} s | "
            f"{_f(a['contrast_test']['mean_abs'])} ({_f(a['contrast_test']['ci'][0])}–"
            f"{_f(a['contrast_test']['ci'][1])}) | {_pct(c['cut'])} ({_pct(c['cut_ci'][0])} to "
            f"{_pct(c['cut_ci'][1])}) | {_f(a['contrast_edit']['mean_abs'])} ({_pct(c['cut_edit'])}) | "
            f"{_f(a['contrast_heldout_occ']['mean_abs'])} ({_pct(c['cut_heldout_occ'])}) | "
            f"{_f(a['definitional'])} ({_f(-100 * c['definitional_drop'], '{:+.1f}')} pt) | "
            f"{_f(a['definitional_share'])} ({_f(-c['share_drop'], '{:+.3f}')}) | "
            f"{_f(a['facts'])} ({_f(-100 * c['facts_drop'], '{:+.1f}')} pt) | "
            f"{_f(a['perplexity'])} ({_pct(c['ppl_rise'], True)}) | "
            f"{'exact' if r['undo_exact'] else 'NOT exact'} |")
    return lines


def bounds_table(res: dict[str, Any]) -> list[str]:
    lines = ["| method | bounds | cut | definitional | facts | perplexity | all |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        kind = r["bounds"]
        if "checks" not in r:
            lines.append(f"| {r['method']} | {kind} | n/a | n/a | n/a | n/a | **FAIL** (raised) |")
            continue
        cells = [_bound_cell(kind, r["checks"].get(n), n) for n in BOUND_LABELS]
        lines.append(f"| {r['method']} | {kind} | " + " | ".join(cells) +
                     f" | {'pass' if r['passes'] else '**FAIL**'} |")
    return lines


def template_table(res: dict[str, Any]) -> list[str]:
    """Held-out templates × methods: signed contrast (base) and after (cut of |contrast|)."""
    base = res["base"]["contrast_test"]["per_template"]
    rows = [r for r in res["rows"] if "changes" in r]
    head = "| held-out template | base | " + " | ".join(r["method"] for r in rows) + " |"
    lines = [head, "|---|---|" + "---|" * len(rows)]
    for t, b in base.items():
        cells = []
        for r in rows:
            pt = {x["template"]: x for x in r["changes"]["per_template"]}.get(t)
            cells.append("n/a" if pt is None else f"{pt['after']:+.3f} ({_pct(pt['cut'])}"
                         f"{', flipped' if pt['flipped'] else ''})")
        lines.append(f"| `{t}` | {b:+.3f} | " + " | ".join(cells) + " |")
    return lines


def shortfalls(res: dict[str, Any]) -> list[str]:
    """Numbers behind every missed bound (no interpretation)."""
    out = []
    b = res["base"]
    for r in res["rows"]:
        if "changes" not in r:
            out.append(f"- **{r['method']}** raised after {_f(r.get('seconds'), '{:.0f}')} s: "
                       f"`{_oneline(r.get('error', ''), 1200)}`.")
            continue
        failed = [n for n, c in r["checks"].items() if not c["pass"]]
        if not failed:
            continue
        c, a = r["changes"], r["measures"]
        items = []
        if "cut" in failed:
            pts = c["per_template"]
            still = [p for p in pts if not p["cut"] >= STILL]
            grew = [p for p in pts if p["cut"] < 0]
            flipped = [p for p in pts if p["flipped"]]
            per = "; ".join(f"`{p['template']}` {abs(p['before']):.3f}→{abs(p['after']):.3f} ({_pct(p['cut'])})"
                            for p in sorted(pts, key=lambda p: p["cut"]))
            txt = (f"cut {_pct(c['cut'])} < {BOUNDS[r['bounds']]['cut']:.0%} on held-out templates, "
                   f"{_pct(c['cut_edit'])} on edit templates, {_pct(c['cut_heldout_occ'])} on held-out "
                   f"occupations. Per held-out template (|contrast| base→after, cut): {per}.")
            txt += (f" Did not move (cut < {STILL:.0%}): {len(still)} of {len(pts)}"
                    + (f" ({', '.join('`' + p['template'] + '`' for p in still)})" if still else "") + ".")
            if grew:
                txt += f" Grew: {len(grew)}."
            if flipped:
                txt += f" Sign flipped (over-corrected): {', '.join('`' + p['template'] + '`' for p in flipped)}."
            items.append(txt)
        if "definitional_drop" in failed:
            items.append(f"definitional accuracy {b['definitional']:.3f}→{a['definitional']:.3f} "
                         f"({-100 * c['definitional_drop']:+.1f} pt; bound −{BOUNDS[r['bounds']]['definitional_drop'] * 100:g}), "
                         f"mean correct share {b['definitional_share']:.3f}→{a['definitional_share']:.3f}.")
        if "facts_drop" in failed:
            items.append(f"facts {b['facts']:.3f}→{a['facts']:.3f} ({-100 * c['facts_drop']:+.1f} pt).")
        if "ppl_rise" in failed:
            items.append(f"perplexity {b['perplexity']:.3f}→{a['perplexity']:.3f} ({_pct(c['ppl_rise'], True)}; "
                         f"bound +{BOUNDS[r['bounds']]['ppl_rise']:.0%}).")
        items.append(f"Chose {_chosen_text(r.get('chosen')) or 'nothing recorded'}; "
                     + _sweep_text(r.get("sweep") or [], r.get("validation_base")))
        out.append(f"- **{r['method']}** misses {', '.join(BOUND_LABELS[n] for n in failed)}: " + " ".join(items))
    return out or ["- every method is within its bounds."]


def _sweep_text(rows: list[dict[str, Any]], base: float | None = None) -> str:
    """The validation sweep in numbers, per site (layer set) when the sweep has several."""
    if not rows:
        return "no validation sweep recorded."
    head = f"validation sweep ({len(rows)} settings" + (f", base validation contrast {base:.4f}" if base is not None
                                                         else "") + ")"
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        layers = r["setting"].get("layers")
        key = "L" + ",".join(map(str, layers)) if isinstance(layers, list) else "all settings"
        groups.setdefault(key, []).append(r)
    parts = []
    for key, rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        best = min(rs, key=lambda r: r["contrast"])
        txt = f"{key}: {len(ok)} of {len(rs)} within bounds"
        if ok:
            bo = min(ok, key=lambda r: r["contrast"])
            txt += f", lowest within {bo['contrast']:.4f} ({_chosen_text(_no_layers(bo['setting']))})"
        if best not in ok:
            txt += (f", lowest overall {best['contrast']:.4f} ({_chosen_text(_no_layers(best['setting']))}; "
                    f"refused: {best['why'] or 'outside the bounds'})")
        parts.append(txt)
    return head + ": " + "; ".join(parts) + "."


def _no_layers(setting: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in setting.items() if k != "layers" and k not in _METRIC_KEYS}


def _oneline(s: str, n: int = 300) -> str:
    s = " ".join(str(s).split()).replace("|", "\\|").replace("`", "'")
    return s if len(s) <= n else s[: n - 1] + "…"


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    out = ["| organism | model | base contrast | LSDM within editor bounds | unlearning methods within bounds | "
           "all editors within editor bounds | methods run | time |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        rows = {r["method"]: r for r in res["rows"]}
        lsdm = rows.get("LSDM")
        unl = [r for r in res["rows"] if r["kind"] == "unlearning"]
        eds = [r for r in res["rows"] if r["kind"] == "editor"]
        def yes(r):
            return bool(r.get("passes"))
        out.append(
            f"| {res['model']} | {res['family']} | {_f(res['base']['contrast_test']['mean_abs'])} | "
            f"{'not run' if lsdm is None else ('yes' if yes(lsdm) else 'no')} | "
            f"{sum(map(yes, unl))} of {len(unl)}"
            + (f" ({', '.join(r['method'] for r in unl if yes(r))})" if any(map(yes, unl)) else "") + " | "
            f"{sum(map(yes, eds))} of {len(eds)}"
            + (f" ({', '.join(r['method'] for r in eds if yes(r))})" if any(map(yes, eds)) else "") + " | "
            f"{len(res['rows'])} | {res['seconds']:.0f} s |")
    return out


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    eb, ub = BOUNDS["editor"], BOUNDS["unlearning"]
    lines = [
        "# Edits that generalise: every method on both organisms (issue 15)",
        "",
        f"Produced by `{meta['argv']}` ({meta['date']}, seed {meta['seed']}, "
        f"{meta['threads']} CPU thread(s) on a shared machine, so wall times are rough; "
        f"total {meta['total_seconds']:.0f} s"
        + (f"; **subsampled run**: each prompt set cut to about {meta['limit']} prompts" if meta.get("limit") else "")
        + (f"; perplexity on the first {meta['ppl_tokens']} tokens" if meta.get("ppl_tokens") else "")
        + "). Every method runs with its library defaults on the model's default data "
        "(`biaslens.defaults.defaults_for(model)`: edit occupations × edit templates for the editors, "
        "`unlearn_data()` for the unlearning methods), the same call for both organisms, from the same base "
        "weights; it is undone afterwards and the weights hash checked (column *undo*). Strengths and sites "
        "are chosen by each method on the validation templates, never on the held-out (test) templates. "
        "Wall time is the method call alone (tracing, tuning and validation included; key statistics "
        "of general text only when not already in the covariance cache).",
        "",
        "Headline: the stereotype contrast (`biaslens.evaluate.contrast`: per template, mean P(f)/(P(f)+P(m)) "
        "over female-stereotyped occupations minus over male-stereotyped ones; mean |contrast| over "
        "templates, bootstrap CI over templates) on **training occupations × held-out templates** "
        "(`occupation_prompts(\"edit\", \"test\")`); the cut is 1 − after/base with a paired bootstrap CI "
        "over templates. For information: the same on edit templates and on held-out occupations × held-out "
        "templates (the organisms never saw those occupations with a pronoun). Definitional accuracy and "
        "mean correct-pronoun share on `definitional_prompts(\"all\")`, factual probes and general-text "
        "perplexity as `biaslens.evaluate.suite` scores them.",
        "",
        f"Bounds (never loosened): **editor** — cut ≥ {eb['cut']:.0%}, definitional down ≤ "
        f"{eb['definitional_drop'] * 100:g} point, facts down ≤ {eb['facts_drop'] * 100:g} point, perplexity up ≤ "
        f"{eb['ppl_rise']:.0%} (LSDM's acceptance; DAMA, LEACE, ROME and CDA shown against them for comparison); "
        f"**unlearning** — cut ≥ {ub['cut']:.0%}, perplexity up ≤ {ub['ppl_rise']:.0%}, definitional down ≤ "
        f"{ub['definitional_drop'] * 100:g} points.",
        "",
        *(["† rows kept from the record's earlier run (`--update` re-ran only "
           f"{', '.join(meta.get('methods', []))}); everything else was measured in this run.", ""]
          if any(r.get("rerun") is False for res in results for r in res["rows"]) else []),
        "## Summary",
        "",
        *summary_lines(results),
        "",
    ]
    for res in results:
        lines += [f"## {res['model']} ({res['family']})", "",
                  f"Base weights SHA-256 `{res['base_hash'][:16]}…`; "
                  f"{res['base']['contrast_test']['n_templates']} held-out templates × "
                  f"{res['base']['contrast_test']['n_prompts'] // max(1, res['base']['contrast_test']['n_templates'])} "
                  f"training occupations; {res['base']['n_definitional']} definitional prompts, "
                  f"{res['base']['n_facts']} factual probes.", "",
                  *main_table(res), "", "### Bounds", "", *bounds_table(res), "",
                  "### Per held-out template (signed contrast after; cut of |contrast|)", "",
                  *template_table(res), "", "### Why it falls short", "",
                  "Generated from the numbers above, only where a method misses a bound; interpretation is "
                  "left to the reader.", "", *shortfalls(res), ""]
    return "\n".join(lines) + "\n"


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf to None, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


#: the modules the methods and measures live in, imported before the first row
MODULES = ("biaslens.edit.least_squares", "biaslens.edit.tune", "biaslens.edit.baselines", "biaslens.edit.projection",
           "biaslens.edit.erasure", "biaslens.unlearn.common", "biaslens.unlearn.select", "biaslens.unlearn.partitioned",
           "biaslens.unlearn.task_vector", "biaslens.unlearn.masked_ascent", "biaslens.unlearn.offset",
           "biaslens.evaluate.suite", "biaslens.evaluate.contrast", "biaslens.defaults")


def load_methods() -> dict[str, str]:
    """Import every method's module up front, so one run uses one version of the code from its
    first row to its last; returns each module's source hash (SHA-256, 12 hex digits) for the record."""
    import hashlib
    import importlib

    out = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        src = Path(getattr(mod, "__file__", "") or "")
        out[name] = hashlib.sha256(src.read_bytes()).hexdigest()[:12] if src.is_file() else "?"
    return out


def _command(argv: list[str]) -> str:
    """The command line as written into the record, paths inside the repository made relative."""
    out = ["python", "scripts/generalise.py"]
    for a in argv:
        try:
            out.append(str(Path(a).resolve().relative_to(REPO)) if os.sep in a else a)
        except ValueError:
            out.append(a)
    return " ".join(out)


# ------------------------------------------------------------------------------------ main


def _merge(record: Path, new: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """The earlier record's results with the rows of ``methods`` replaced by ``new``'s (same
    organism; base numbers from the new run, which must match the earlier base weights)."""
    if not record.is_file():
        return new
    old = {r["model"]: r for r in json.loads(record.read_text(encoding="utf-8"))["results"]}
    out = []
    for res in new:
        prev = old.get(res["model"])
        if prev is None or prev.get("base_hash") != res.get("base_hash"):
            out.append(res)
            continue
        fresh = {r["method"]: r for r in res["rows"]}
        rows = [fresh.pop(r["method"]) if r["method"] in fresh else {**r, "rerun": False}
                for r in prev["rows"]]
        out.append({**res, "rows": rows + list(fresh.values()),
                    "seconds": prev.get("seconds", 0.0)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", default=",".join(ORGANISMS), help="comma-separated model specs")
    ap.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "generalise.md",
                    help="markdown output; the JSON record goes next to it (.json)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: methods {', '.join(QUICK_METHODS)} and prompt sets of about "
                         f"{QUICK_LIMIT} prompts (unless --methods / --limit say otherwise)")
    ap.add_argument("--limit", type=int, default=None, help="subsample each measured prompt set")
    ap.add_argument("--ppl-tokens", type=int, default=None,
                    help=f"tokens of general text for perplexity (default: the suite's; --quick: {QUICK_PPL_TOKENS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    ap.add_argument("--progress", action="store_true", help="show the methods' progress bars")
    ap.add_argument("--update", action="store_true",
                    help="re-run only --methods and replace their rows in the existing JSON record "
                         "next to --out (the other rows, and their dates, are kept and marked)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the markdown from the JSON record next to --out (no model is run)")
    args = ap.parse_args(argv)
    if args.render_only:
        record = args.out.with_suffix(".json")
        if not record.is_file():
            print(f"no record {record} to render; run the script first", file=sys.stderr)
            return 2
        rec = json.loads(record.read_text(encoding="utf-8"))
        text = markdown(rec.pop("results"), rec)
        args.out.write_text(text, encoding="utf-8")
        print(text)
        return 0
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(QUICK_METHODS if args.quick else METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else None)
    if limit is not None and limit < 1:
        print("--limit must be a positive number of prompts", file=sys.stderr)
        return 2
    ppl_tokens = args.ppl_tokens if args.ppl_tokens is not None else (QUICK_PPL_TOKENS if args.quick else None)
    if ppl_tokens is not None and ppl_tokens < 1:
        print("--ppl-tokens must be a positive number of tokens", file=sys.stderr)
        return 2
    organisms = [o.strip() for o in args.organisms.split(",") if o.strip()]

    import torch

    import biaslens

    torch.set_num_threads(args.threads)
    code = load_methods()
    t0 = time.perf_counter()
    results = []
    for spec in organisms:
        t_load = time.perf_counter()
        model = biaslens.load(spec)
        print(f"[{spec}] loaded in {time.perf_counter() - t_load:.0f} s; measuring the base model",
              file=sys.stderr)
        results.append(run_organism(model, methods, limit, args.seed, args.progress, name=spec,
                                    ppl_tokens=ppl_tokens))
        del model
    total = time.perf_counter() - t0
    if args.update:
        results = _merge(args.out.with_suffix(".json"), results, methods)
    meta = {"date": datetime.date.today().isoformat(), "seed": args.seed, "threads": torch.get_num_threads(),
            "limit": limit, "ppl_tokens": ppl_tokens, "methods": methods, "organisms": organisms, "total_seconds": total,
            "argv": _command(argv if argv is not None else sys.argv[1:]),
            "bounds": BOUNDS, "code": code}
    text = markdown(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    record = args.out.with_suffix(".json")
    record.write_text(json.dumps(_clean({**meta, "results": results}), indent=1, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    print(text)
    print(f"wrote {args.out} and {record}; total {total:.0f} s ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
