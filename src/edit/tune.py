"""Automatic choice of LSDM's regularisation and layers on validation templates.

``biaslens.edit.lsdm(model)`` with ``tune="auto"`` (the default) chooses λ (``mom2_weight``), the
keep weight and the layer window itself, on prompts it never edits with and that are disjoint
from the test templates (:mod:`biaslens.defaults`: edit occupations × *validation* templates):

* objective: the validation mean |stereotype contrast| (:mod:`biaslens.evaluate.contrast`: per
  template, mean P(f)/(P(f)+P(m)) over female-stereotyped occupations minus over male-stereotyped
  ones), to be minimised,
* subject to retention bounds checked on validation data (:class:`TuneBounds`): definitional
  gender by *probability margin*, not argmax, on the definitional prompts the unedited model
  already separates (validation templates and a sample of the edit templates, every pronoun
  form): the mean normalised correct-pronoun probability may fall by at most
  ``definitional_share_drop`` and no such prompt may fall below ``definitional_floor``; no
  factual probe the model answers may be lost; perplexity on general text the key statistics
  did not read may rise by at most ``ppl_rise``.

Candidates: layer windows from the effect map's ranking at the site's role (the best
``TuneGrid.top_layers`` layers alone, and adjacent pairs among them), and for each a pattern
search over a grid of λ per key column × keep weight (:class:`TuneGrid`; the data term of the
solve grows with the number of key columns, so λ is scaled by it). One candidate is a solve with
cached key statistics and cached targets (:class:`biaslens.edit.least_squares.EditCache`; targets
once per top layer) and one validation pass; the weights are restored from a snapshot between
candidates. The sweep, the bounds and the choice go into ``delta.info["diagnostics"]["tuning"]``
(hence the export manifest and ``biaslens edit``'s report.json); docs/results/edit.md has the
sweep and the held-out numbers on the organisms.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.errors import BiasLensError
from biaslens.prompts import female_rate

if TYPE_CHECKING:
    import torch

    from biaslens.edit.hparams import LSDMHparams
    from biaslens.edit.least_squares import EditCache
    from biaslens.model import BiasModel

__all__ = ["TuneBounds", "TuneGrid", "Candidate", "TuneResult", "Validation", "default_validation",
           "heldout_lines", "tune_lsdm"]


@dataclass(frozen=True)
class TuneBounds:
    """Retention bounds a tuned setting must meet on validation data (defaults leave headroom
    under the acceptance bounds: definitional and fact accuracy down ≤ 1 point, perplexity up
    ≤ 2%)."""

    #: a definitional prompt counts as separated when the unedited model gives the matching
    #: pronoun at least this share of the pair's probability
    separated_share: float = 0.9
    #: the mean correct share over separated prompts may fall by at most this
    definitional_share_drop: float = 0.02
    #: no separated prompt may end below this correct share (a collapsed margin: the
    #: calibration on the organism saw argmax survive while p fell from 0.98 to 0.57)
    definitional_floor: float = 0.6
    #: factual probes answered before that may be lost
    facts_lost: int = 0
    #: relative perplexity rise allowed on the held-out general text
    ppl_rise: float = 0.015


@dataclass(frozen=True)
class TuneGrid:
    """The candidates: λ = ``mom2_per_column`` × number of key columns, ``keep_weights``, and
    windows from the best ``top_layers`` layers of the effect map (alone and adjacent pairs;
    a layer whose effect is below ``min_effect_ratio`` of the best one's is not a place the bias
    lives, so it is left out: on the organism the last-token MLP effect is 0.77 at layer 0 and
    0.05 at layer 1, and layer-1 edits that looked harmless on validation cost 4 points of
    definitional accuracy on the held-out templates, docs/results/edit.md).
    The search starts at index ``start`` of (λ, keep weight) and moves to the best neighbour
    (feasible before infeasible, then lower contrast, then less violation) until none is better."""

    #: wide on purpose: the search only walks to neighbours, and the scale that balances the
    #: data term differs by role (organism-llama at its subject role needed 50 per column)
    mom2_per_column: tuple[float, ...] = (0.05, 0.15, 0.5, 1.5, 5.0, 15.0, 50.0, 150.0)
    keep_weights: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    top_layers: int = 2
    #: a layer joins the windows only with at least this fraction of the best layer's effect
    min_effect_ratio: float = 0.25
    start: tuple[int, int] = (1, 1)
    #: the search of one window stops after this many candidates (a budget: on a random model
    #: nothing may be feasible and the walk would cross the whole grid; the organisms' searches
    #: end within 12)
    max_per_window: int = 16
    #: a window whose first ``patience`` candidates all fail to lower the validation contrast by
    #: at least ``min_cut`` (a fraction of the unedited model's) is dropped: no strength there
    #: reaches the bias (on a random model every window does this, and the walk toward the least
    #: violation only spends time; on both organisms every candidate of every window cuts it by
    #: more than a third)
    patience: int = 5
    min_cut: float = 0.05


@dataclass
class Candidate:
    """One setting the tuner scored (validation numbers; ``feasible`` = within every bound)."""

    layers: list[int]
    mom2_weight: float
    keep_weight: float
    contrast: float
    definitional_share_drop: float
    definitional_broken: int
    facts_lost: int
    ppl_rise: float
    feasible: bool
    violation: float
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def rank(self) -> tuple:
        """Sort key: feasible first, then by contrast; infeasible by violation."""
        return (0, self.contrast, 0.0) if self.feasible else (1, self.violation, self.contrast)


@dataclass
class TuneResult:
    """The choice (``layers``, ``mom2_weight``, ``keep_weight``), whether it is within the bounds,
    every candidate scored, the unedited model's validation numbers and what was validated on."""

    layers: list[int]
    role: str
    mom2_weight: float
    keep_weight: float
    feasible: bool
    chosen: Candidate
    candidates: list[Candidate]
    windows: list[list[int]]
    base: dict[str, float]
    validation: dict[str, Any]
    bounds: TuneBounds
    grid: TuneGrid
    seconds: float

    def warn(self) -> None:
        """Say on stderr that no setting met every bound (the closest one is used)."""
        c = self.chosen
        print(f"biaslens: warning: no LSDM setting met every retention bound on the validation "
              f"templates; using the closest (L{c.layers} @{self.role}, λ={c.mom2_weight:g}, keep "
              f"{c.keep_weight:g}: {', '.join(c.failed)}); see the tuning sweep", file=sys.stderr)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": {"layers": self.layers, "role": self.role, "mom2_weight": self.mom2_weight,
                       "keep_weight": self.keep_weight, "within_bounds": self.feasible,
                       "validation": asdict(self.chosen)},
            "objective": "minimise the validation mean |stereotype contrast| within the bounds",
            "base": self.base, "bounds": asdict(self.bounds), "grid": asdict(self.grid),
            "windows": self.windows, "validation": self.validation,
            "sweep": [asdict(c) for c in self.candidates], "seconds": round(self.seconds, 2),
        }


# ------------------------------------------------------------------------------ validation data
def heldout_lines(model: "BiasModel", corpus: str | Path, stats_tokens: int, n_tokens: int = 2000,
                  ppl_text: str | Path | None = None) -> tuple[list[str], str]:
    """``(lines, source)``: about ``n_tokens`` tokens of general text, one document a line, that
    the key statistics did not read: the model's perplexity text when it is another file than
    ``corpus``, else the lines of ``corpus`` after the first ``stats_tokens`` tokens."""
    from biaslens.defaults import defaults_for

    corpus = Path(corpus)
    other = Path(ppl_text) if ppl_text is not None else Path(defaults_for(model).ppl_text)
    same = other.resolve() == corpus.resolve() if other.exists() and corpus.exists() else False
    src = corpus if same or not other.exists() else other
    lines = [ln for ln in src.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    counts = [len(r) for r in model.tokenize(lines, length="any")]
    start = 0
    if src == corpus:
        seen = 0
        while start < len(lines) and seen < stats_tokens:
            seen += counts[start]
            start += 1
    out, total = [], 0
    for ln, c in zip(lines[start:], counts[start:]):
        if total >= n_tokens:
            break
        out.append(ln)
        total += c
    if total < min(n_tokens, 500):
        raise BiasLensError(f"the general text '{src}' has only {total} tokens beyond the "
                            f"{stats_tokens} its key statistics read; pass a longer --corpus")
    where = (f"{src.name}: lines {start + 1}..{start + len(out)} (after the key statistics' "
             f"{stats_tokens} tokens)" if src == corpus else f"{src.name}: first {len(out)} lines")
    return out, where


def _spread(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (all when there are at most ``k``)."""
    if len(items) <= k:
        return list(items)
    return [items[round(j * (len(items) - 1) / (k - 1))] for j in range(k)] if k > 1 else items[:1]


@dataclass
class Validation:
    """The validation data of one tuning: occupation prompts (for the contrast), definitional
    prompts (only those the unedited model separates enter the bounds), factual probes and
    general-text lines; :meth:`prepare` scores the unedited model, :meth:`score` an edited one."""

    prompts: list
    definitional: list
    facts: list[tuple[str, str]]
    ppl_lines: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    _base: dict | None = None

    def prepare(self, model: "BiasModel", bounds: TuneBounds) -> dict[str, float]:
        """Score the unedited model; keep the separated definitional prompts, the fact rows and
        the perplexity windows for :meth:`score`. Returns the base numbers."""
        import numpy as np

        from biaslens.evaluate.fluency import context_length, window_rows
        from biaslens.evaluate.scoring import continuation_rows, token_rows

        if not self.prompts:
            raise BiasLensError("no validation prompts: the tuner needs occupation prompts on "
                                "validation templates (pass tune='off' with explicit values)")
        margin = self._def_margins(model, self.definitional) if self.definitional else np.zeros(0)
        share = 1.0 / (1.0 + np.exp(-margin))
        keep = np.flatnonzero(share >= bounds.separated_share)
        self.definitional = [self.definitional[i] for i in keep]
        self._def_margin0 = margin[keep]
        self._fact_rows = continuation_rows(model, [p for p, _ in self.facts], [a for _, a in self.facts]) \
            if self.facts else None
        window = min(context_length(model), 128)
        rows, starts = [], []
        for ids in token_rows(model, self.ppl_lines, length="any"):
            if len(ids) >= 2:
                r, s0 = window_rows(ids, window, max(1, window // 2))
                rows += r
                starts += s0
        self._ppl_rows = (rows, starts)
        base = self._measure(model)
        self._facts0 = base.pop("_facts_correct")
        base["n_separated_definitional"] = int(len(keep))
        base["n_definitional_checked"] = int(len(margin))
        self._base = base
        return {k: v for k, v in base.items() if not k.startswith("_")}

    def score(self, model: "BiasModel", bounds: TuneBounds) -> dict[str, Any]:
        """The edited model's contrast and its distance to each bound."""
        import numpy as np

        if self._base is None:
            raise RuntimeError("Validation.prepare first")
        m = self._measure(model)
        out: dict[str, Any] = {"contrast": m["contrast"]}
        if len(self._def_margin0):
            s0 = 1.0 / (1.0 + np.exp(-self._def_margin0))
            s1 = 1.0 / (1.0 + np.exp(-m["_def_margin"]))
            out["definitional_share_drop"] = float(s0.mean() - s1.mean())
            out["definitional_broken"] = int((s1 < bounds.definitional_floor).sum())
        else:
            out["definitional_share_drop"], out["definitional_broken"] = 0.0, 0
        lost = self._facts0 & ~m["_facts_correct"] if self._facts0 is not None else None
        out["facts_lost"] = int(lost.sum()) if lost is not None else 0
        out["ppl_rise"] = float(m["perplexity"] / self._base["perplexity"] - 1) \
            if self._base.get("perplexity") else 0.0
        return out

    # ---------------------------------------------------------------------- scoring
    def _measure(self, model: "BiasModel") -> dict[str, Any]:
        import numpy as np

        from biaslens.evaluate.contrast import contrast_metrics, template_of
        from biaslens.evaluate.scoring import score_rows

        margin = self._margins(model, self.prompts)
        lp = np.stack([np.zeros_like(margin), margin], 1)  # only the difference matters
        c = contrast_metrics(lp, [female_rate(p) for p in self.prompts],
                             [template_of(p) for p in self.prompts],
                             [getattr(p, "occupation", template_of(p)) for p in self.prompts])
        values = c.get("values", c)
        out: dict[str, Any] = {"contrast": float(values["mean_abs_contrast"])}
        if self.definitional:
            dm = self._def_margins(model, self.definitional)
            out["_def_margin"] = dm
            out["definitional_mean_share"] = float((1.0 / (1.0 + np.exp(-dm))).mean())
        else:
            out["_def_margin"] = np.zeros(0)
        if self._fact_rows is not None:
            s = score_rows(model, *self._fact_rows, batch_size=64, progress=False, greedy=True)
            ok = np.array([bool(g.all()) for g in s.greedy])
            out["_facts_correct"] = ok
            out["facts_accuracy"] = float(ok.mean())
        else:
            out["_facts_correct"] = None
        rows, starts = self._ppl_rows
        if rows:
            s = score_rows(model, rows, starts, batch_size=64, progress=False)
            out["perplexity"] = float(math.exp(-s.sums().sum() / max(1, s.counts().sum())))
        return out

    def _def_margins(self, model, prompts):
        import numpy as np

        m = self._margins(model, prompts)
        female = np.array([female_rate(p) >= 0.5 for p in prompts])
        return np.where(female, m, -m)

    def _margins(self, model: "BiasModel", prompts: list) -> "Any":
        """logit(female) − logit(male) at each prompt's next token (= log P(f) − log P(m)):
        prompts of one length per batch, only the last position unembedded."""
        import numpy as np
        import torch

        from biaslens.errors import VocabularyError
        from biaslens.evaluate.probes import pronoun_logprobs
        from biaslens.metrics import pronoun_ids

        try:
            male, female = pronoun_ids(model, prompts)
        except VocabularyError:  # a pronoun of several tokens: the general scorer
            lp = pronoun_logprobs(model, prompts, self.batch_size)
            return lp[:, 1] - lp[:, 0]
        batch = model.encode(prompts)
        from biaslens.edit.targets import length_buckets

        out = torch.empty(len(prompts))
        with torch.inference_mode():
            for idx in length_buckets(batch.lengths, self.batch_size):
                sub = batch.select(idx)
                logits = model.bridge.run_with_hooks(sub.input_ids, attention_mask=sub.attention_mask,
                                                     fwd_hooks=[], logits_to_keep=1)[:, -1].float()
                rows = torch.arange(len(idx), device=logits.device)
                out[idx] = (logits[rows, female[idx]] - logits[rows, male[idx]]).cpu()
        return out.numpy().astype(np.float64)


def default_validation(model: "BiasModel", prompts: Sequence[Any], keep_prompts: Sequence[Any],
                       corpus: str | Path, stats_tokens: int, per_side: int = 8,
                       keep_sample: int = 256, ppl_tokens: int = 2000, seed: int = 0) -> Validation:
    """The model's validation data (:mod:`biaslens.defaults`): the edit prompts' occupations
    (``per_side`` female- and ``per_side`` male-stereotyped ones, spread over the rates) × the
    validation templates; definitional words × validation templates plus a seeded sample of
    ``keep_sample`` keep prompts (edit templates); the model's factual probes; ``ppl_tokens``
    tokens of general text the key statistics did not read (:func:`heldout_lines`). Refuses
    validation templates that are test templates."""
    import random

    from biaslens.defaults import defaults_for, fill_templates, organism_templates, templates
    from biaslens.evaluate.contrast import template_of

    d = defaults_for(model)
    rows = organism_templates("validation") if d.organism else templates("validation")
    occ: dict[str, tuple[str, float, str]] = {}
    for p in prompts:
        name = getattr(p, "occupation", None) or getattr(p, "subject", None)
        rate = female_rate(p)
        if name and math.isfinite(rate) and rate != 0.5:
            occ.setdefault(name, (name, float(rate), getattr(p, "occupation_split", "edit")))
    fem = sorted((o for o in occ.values() if o[1] > 0.5), key=lambda o: o[1])
    mal = sorted((o for o in occ.values() if o[1] < 0.5), key=lambda o: o[1])
    if not fem or not mal:
        raise BiasLensError("the tuner needs edit prompts with female- and male-stereotyped "
                            "occupations (female_rate above and below 0.5); pass tune='off'")
    chosen = _spread(fem, per_side) + _spread(mal, per_side)
    val = fill_templates(chosen, "validation", rows)
    words = [(w, r, s) for w, r, s in {(p.subject, female_rate(p), "definitional")
                                       for p in d.definitional_prompts("edit")}]
    definitional = fill_templates(sorted(words), "validation", rows)
    keep = list(keep_prompts)
    if len(keep) > keep_sample:
        keep = random.Random(seed).sample(keep, keep_sample)
    test = {template_of(p) for p in d.occupation_prompts("edit", "test")}
    val_tpl = {template_of(p) for p in val + definitional}
    if val_tpl & test:
        raise BiasLensError("validation templates overlap the test templates; the tuner must "
                            "never see a test template")
    lines, where = heldout_lines(model, corpus, stats_tokens, ppl_tokens)
    edit_tpl = {template_of(p) for p in prompts}
    info = {"occupations": [o[0] for o in chosen], "n_templates": len({template_of(p) for p in val}),
            "n_prompts": len(val), "definitional": f"{len(definitional)} on validation templates + "
            f"{len(keep)} keep prompts (edit templates)", "facts": len(d.facts()), "general_text": where,
            "disjoint_from_test": True, "validation_shares_edit_templates": bool(val_tpl & edit_tpl),
            "edit_prompts_touch_test_templates": bool(edit_tpl & test)}
    return Validation(val, definitional + keep, list(d.facts()), lines, info)


# ------------------------------------------------------------------------------ the search
def _judge(s: dict, bounds: TuneBounds) -> tuple[bool, float, list[str]]:
    """``(within every bound, total violation, names of the bounds missed)``; a non-finite
    number is out of bounds with infinite violation."""
    if not all(math.isfinite(float(s[k])) for k in ("contrast", "definitional_share_drop",
                                                     "definitional_broken", "facts_lost", "ppl_rise")):
        return False, math.inf, ["nonfinite"]
    failed, v = [], 0.0
    checks = [("definitional_share", s["definitional_share_drop"], bounds.definitional_share_drop),
              ("ppl", s["ppl_rise"], bounds.ppl_rise)]
    for name, x, lim in checks:
        if x > lim + 1e-12:
            failed.append(name)
            v += (x - lim) / max(lim, 1e-6)
    if s["definitional_broken"] > 0:
        failed.append("definitional_margin")
        v += float(s["definitional_broken"])
    if s["facts_lost"] > bounds.facts_lost:
        failed.append("facts")
        v += float(s["facts_lost"] - bounds.facts_lost)
    return not failed, v, failed


def tune_lsdm(model: "BiasModel", cache: "EditCache", windows: list[list[int]],
              covs: dict[int, "torch.Tensor"], hp: "LSDMHparams", validation: Validation,
              mom2_weights: Sequence[float] | None = None, keep_weights: Sequence[float] | None = None,
              bounds: TuneBounds | None = None, grid: TuneGrid | None = None,
              progress: bool = True, warn: bool = True, *, apply_edit: Any) -> TuneResult:
    """Score the candidates on ``validation`` and return the choice; the model is left as it was
    (every candidate is undone from a snapshot). ``mom2_weights`` / ``keep_weights``: fixed
    values (one each, when the user gave them), else the grid's. ``apply_edit``: the solve that
    edits the model for one candidate (:func:`biaslens.edit.least_squares.apply_lsdm`, passed in
    by :func:`~biaslens.edit.least_squares.lsdm` so this module does not import its caller)."""
    import torch

    apply_lsdm = apply_edit
    bounds, grid = bounds or TuneBounds(), grid or TuneGrid()
    t0 = time.perf_counter()
    n_cols = cache.site.n_groups
    lams = list(mom2_weights) if mom2_weights else [c * n_cols for c in grid.mom2_per_column]
    keeps = list(keep_weights) if keep_weights else list(grid.keep_weights)
    start = (min(grid.start[0], len(lams) - 1), min(grid.start[1], len(keeps) - 1))
    base = validation.prepare(model, bounds)
    names = sorted({model.mlp_out_name(l) for w in windows for l in w})
    snap = model.snapshot(names)
    candidates: list[Candidate] = []
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    say(f"biaslens: tuning LSDM on {validation.info.get('n_prompts', len(validation.prompts))} "
        f"validation prompts: windows {windows}, λ {[round(x, 1) for x in lams]}, keep {keeps}")

    def run(window: list[int], i: int, j: int) -> Candidate:
        t = time.perf_counter()
        h = replace(hp, mom2_weight=float(lams[i]), keep_weight=float(keeps[j]))
        try:
            apply_lsdm(model, [], [], window, cache.role, covs, h, False, None, cache, residual_left=False)
            bad = model.check_finite(names)
            s = validation.score(model, bounds) if not bad else None
        except BiasLensError as exc:  # e.g. a singular system at this setting
            s, bad = None, [str(exc)]
        finally:
            model.restore(snap)
        if s is None:
            s = {"contrast": math.inf, "definitional_share_drop": math.inf, "definitional_broken": 0,
                 "facts_lost": 0, "ppl_rise": math.inf}
        ok, v, failed = _judge(s, bounds)
        c = Candidate(list(window), float(lams[i]), float(keeps[j]), s["contrast"],
                      s["definitional_share_drop"], s["definitional_broken"], s["facts_lost"],
                      s["ppl_rise"], ok, v, failed, round(time.perf_counter() - t, 2))
        say(f"  L{','.join(map(str, window))} λ={c.mom2_weight:g} keep={c.keep_weight:g}: contrast "
            f"{c.contrast:.4f} (base {base['contrast']:.4f})" + ("" if ok else f" out of bounds: {', '.join(failed)}"))
        candidates.append(c)
        return c

    index = {(lam, kw): (i, j) for i, lam in enumerate(lams) for j, kw in enumerate(keeps)}
    for window in windows:
        cache.target(window[-1], progress)  # the targets of this top layer, on unedited weights
        # later windows start where the best so far is (fewer steps for the costlier pairs)
        best_yet = min(candidates, key=Candidate.rank) if candidates else None
        first = index[(best_yet.mom2_weight, best_yet.keep_weight)] if best_yet and best_yet.feasible else start
        seen: dict[tuple[int, int], Candidate] = {first: run(window, *first)}
        cur = first
        while True:
            near = [(cur[0] + a, cur[1] + b) for a, b in ((1, 0), (-1, 0), (0, 1), (0, -1))
                    if 0 <= cur[0] + a < len(lams) and 0 <= cur[1] + b < len(keeps)]
            near = [n for n in near if n in seen or len(seen) < grid.max_per_window]
            for n in near:
                if n not in seen:
                    seen[n] = run(window, *n)
            if len(seen) >= grid.patience and all(not c.contrast < (1 - grid.min_cut) * base["contrast"]
                                                  for c in seen.values()):
                say(f"  L{','.join(map(str, window))}: none of {len(seen)} settings cut the validation "
                    f"contrast by {grid.min_cut:.0%}; the window is dropped")
                break
            best = min([cur] + near, key=lambda k: seen[k].rank())
            if best == cur:
                break
            cur = best
    chosen = min(candidates, key=Candidate.rank)
    result = TuneResult(chosen.layers, cache.role, chosen.mom2_weight, chosen.keep_weight,
                        chosen.feasible, chosen, candidates, windows, base, validation.info, bounds,
                        grid, time.perf_counter() - t0)
    if warn and not chosen.feasible:
        result.warn()
    return result
