"""scripts/generalise.py (issue 15's comparison of every method on both organisms): its core on a
tiny random model with one real editor, and a method that raises, end to end into the markdown
and JSON records. The full run on the organisms is the script itself (docs/results/generalise.md)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    spec = importlib.util.spec_from_file_location("generalise_script", ROOT / "scripts" / "generalise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    return _script()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import biaslens
    from biaslens.testing import tiny_model

    return biaslens.load(str(tiny_model("gpt2", tmp_path_factory.mktemp("gen") / "gpt2", n_layers=2)))


def _cda(model, ctx):
    """A real library editor, kept small: CDA at layer 0 for one epoch on a few edit prompts."""
    from biaslens.defaults import defaults_for
    from biaslens.edit import counterfactual_finetune

    prompts = defaults_for(model).occupation_prompts("edit", "edit")[:64]
    delta = counterfactual_finetune(model, layers=[0], prompts=prompts, keep_prompts=[],
                                    hparams={"epochs": 1, "lr": 1e-2}, progress=False)
    return model, delta, model


def _breaks(model, ctx):
    """Changes a weight, then raises: the row must record the error and the weights come back."""
    import torch

    with torch.no_grad():
        model.mlp_out_matrix(0).add_(1.0)
    raise RuntimeError("boom in the middle of an edit")


def test_core_rows_templates_bounds_and_errors(gen, tiny, tmp_path):
    registry = {"CDA": ("editor", _cda), "broken": ("unlearning", _breaks)}
    h0 = tiny.weight_hash()
    res = gen.run_organism(tiny, ["CDA", "broken"], limit=32, registry=registry, name="tiny-gpt2",
                           ppl_tokens=1500)
    assert tiny.weight_hash() == h0  # every row undone, the raising one included

    base = res["base"]
    test_tpl = base["contrast_test"]["per_template"]
    assert len(test_tpl) >= 2 and all(math.isfinite(v) for v in test_tpl.values())
    # the headline is the mean |contrast| over the test templates
    assert base["contrast_test"]["mean_abs"] == pytest.approx(sum(abs(v) for v in test_tpl.values()) / len(test_tpl))
    for key in ("contrast_edit", "contrast_heldout_occ"):
        assert base[key]["n_templates"] >= 2
    assert 0 <= base["definitional"] <= 1 and 0 <= base["facts"] <= 1 and base["perplexity"] > 1

    cda, broken = res["rows"]
    assert [cda["method"], broken["method"]] == ["CDA", "broken"]
    assert cda["undo_exact"] and cda["n_tensors_changed"] >= 1 and cda["seconds"] > 0
    assert cda["chosen"]["layers"] == [0]
    # per held-out template: one entry per base template, cut = 1 - |after| / |before|
    pts = cda["changes"]["per_template"]
    assert [p["template"] for p in pts] == list(test_tpl)
    for p in pts:
        assert p["before"] == pytest.approx(test_tpl[p["template"]])
        assert p["cut"] == pytest.approx(1 - abs(p["after"]) / abs(p["before"]))
        assert p["flipped"] == (p["before"] * p["after"] < 0)
    c = cda["changes"]
    assert c["cut"] == pytest.approx(1 - cda["measures"]["contrast_test"]["mean_abs"] / base["contrast_test"]["mean_abs"])
    # editor bounds, each flagged, and the row passes only when all do
    assert set(cda["checks"]) == {"cut", "definitional_drop", "facts_drop", "ppl_rise"}
    assert cda["checks"]["cut"]["pass"] == (c["cut"] >= 0.50)
    assert cda["checks"]["ppl_rise"]["pass"] == (c["ppl_rise"] <= 0.02 + 1e-12)
    assert cda["passes"] == all(x["pass"] for x in cda["checks"].values())

    assert "boom in the middle" in broken["error"] and broken["restored_after_error"] and broken["undo_exact"]
    assert "checks" not in broken

    meta = {"date": "today", "seed": 0, "threads": 1, "limit": 32, "ppl_tokens": 1500, "total_seconds": res["seconds"],
            "argv": "--quick"}
    md = gen.markdown([res], meta)
    assert "| CDA (editor) |" in md and "Why it falls short" in md and "boom in the middle" in md
    for t in test_tpl:  # the per-template table has a row per held-out template
        assert f"| `{t}` |" in md
    assert ("**FAIL**" in md) and ("pass (" in md or not any(x["pass"] for x in cda["checks"].values()))
    # the JSON record is valid JSON (NaN/inf mapped to null)
    json.loads(json.dumps(gen._clean({"results": [res]}), allow_nan=False))


def test_bounds_are_the_issues_and_never_loose(gen):
    eb, ub = gen.BOUNDS["editor"], gen.BOUNDS["unlearning"]
    assert eb == {"cut": 0.50, "definitional_drop": 0.01, "facts_drop": 0.01, "ppl_rise": 0.02}
    assert ub == {"cut": 0.40, "definitional_drop": 0.02, "ppl_rise": 0.10}
    ch = {"cut": 0.45, "definitional_drop": 0.015, "facts_drop": 0.0, "ppl_rise": 0.05}
    e, u = gen.check_bounds("editor", ch), gen.check_bounds("unlearning", ch)
    assert [e[k]["pass"] for k in ("cut", "definitional_drop", "facts_drop", "ppl_rise")] == [False, False, True, False]
    assert [u[k]["pass"] for k in ("cut", "definitional_drop", "ppl_rise")] == [True, True, True]
    assert "facts_drop" not in u
    # a missing (NaN) number fails its bound instead of passing silently
    assert not gen.check_bounds("editor", {**ch, "cut": float("nan")})["cut"]["pass"]


def test_unknown_method_is_refused_before_work(gen, capsys):
    assert gen.main(["--methods", "LSDM,nope", "--organisms", "organism"]) == 2
    assert "nope" in capsys.readouterr().err
