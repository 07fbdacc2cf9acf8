"""The main job end to end on the organism: trace → heatmap → LSDM → evaluate → export → report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    from biaslens.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    paths = run_demo("organism", out)
    return out, paths


def test_demo_writes_everything_and_edit_lowers_the_planted_bias(demo_out):
    out, paths = demo_out
    for key in ("report", "model", "effects", "report_json"):
        assert Path(paths[key]).exists(), key
    rep = json.loads((out / "report.json").read_text())
    assert rep["site"]["layers"] and rep["site"]["role"] in ("last", "subject_last", "after_subject")
    b, a = rep["before"], rep["after"]
    # the planted bias on the edited (training) prompts falls substantially
    assert a["occupations_train"]["mean_abs_gap"] < 0.6 * b["occupations_train"]["mean_abs_gap"]
    # facts and perplexity are kept; definitional gender stays high
    assert a["facts"]["accuracy"] >= b["facts"]["accuracy"] - 0.01
    assert a["perplexity"]["perplexity"] <= 1.02 * b["perplexity"]["perplexity"]
    assert a["definitional"]["accuracy"] >= 0.95
    html = (out / "report.html").read_text()
    assert "plotly" in html and "Where the bias lives" in html and "Before and after" in html
    assert "<script src=\"http" not in html  # self-contained: plotly.js is inlined


def test_demo_headline_is_the_held_out_template_contrast(demo_out):
    """report.json and report.html lead with the stereotype contrast on held-out templates:
    before, after, the relative cut with its CI, and one row per template."""
    import math

    from biaslens.demo import HEADLINE

    out, _ = demo_out
    rep = json.loads((out / "report.json").read_text())
    assert HEADLINE[0][:2] == ("contrast_test", "mean_abs_contrast")
    head = rep["headline"]
    b, a = rep["before"]["contrast_test"], rep["after"]["contrast_test"]
    assert head["benchmark"] == "contrast_test" and head["n"] == b["n"] == 6  # the held-out templates
    assert head["before"] == b["mean_abs_contrast"] and head["after"] == a["mean_abs_contrast"]
    assert head["before"] > 0.15  # the organism's planted stereotype
    assert head["cut"] == pytest.approx(1 - head["after"] / head["before"])
    for key in ("before", "after", "cut"):
        lo, hi = head["ci"][key]
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
    assert head["ci"]["before"] == b["ci"]["mean_abs_contrast"]
    rows = rep["per_template_contrast"]["contrast_test"]
    assert [r["template"] for r in rows] == list(b["per_template"]) == [r["template"] for r in head["per_template"]]
    assert all(r["after"] - r["before"] == pytest.approx(r["change"]) for r in rows)
    assert {"contrast_edit"} <= set(rep["per_template_contrast"])
    html = (out / "report.html").read_text()
    top = html.index("Headline: the stereotype contrast on held-out templates")
    assert top < html.index("Where the bias lives") and "cut " in html[top:top + 2000]
    assert "Stereotype contrast per held-out template" in html
    assert all(r["template"].replace("{occupation}", "") .split()[-1] in html for r in rows)


def test_demo_export_loads_with_transformers_and_matches(demo_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import biaslens

    out, _ = demo_out
    hf = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    ours = biaslens.load(str(out / "model"))
    b = ours.encode(["The nurse said that", "The carpenter said that"])
    with torch.no_grad():
        diff = (ours.forward(b) - hf(b.input_ids, attention_mask=b.attention_mask).logits)
    assert diff[b.attention_mask.bool()].abs().max() <= 1e-5
    man = json.loads((out / "model" / "manifest.json").read_text())
    assert man["method"] == "lsdm" and man["site"]["layers"] == json.loads(
        (out / "report.json").read_text())["site"]["layers"]
    assert len(tok) == len(ours.tokenizer)


def test_report_renders_heatmaps_in_headless_chromium(demo_out, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from screenshot import find_chromium, png_pixels, screenshot

    if find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    out, _ = demo_out
    png = screenshot(out / "report.html", tmp_path / "report.png", width=1200, height=700)
    img = png_pixels(png)
    # the heatmap panels draw saturated reds/blues; a page without rendered plots is grey on white
    red = (img[..., 0] > 150) & (img[..., 1] < 90) & (img[..., 2] < 90)
    assert red.sum() > 2000, "no heatmap colours on the rendered page"
