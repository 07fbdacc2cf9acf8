"""Acceptance: the CLI's main path on a user's own model of every family, with no data flag.

Each family is a small random model saved with ``save_pretrained`` (what a user's Hugging Face
folder looks like): GPT-2, GPT-NeoX and OPT with the real GPT-2 BPE, LLaMA with grouped-query
attention and a SentencePiece-style tokenizer, and a GPT-2 that reads only 64 positions. Every
command runs in-process through :func:`biaslens.cli.main` with the defaults the package ships;
runs are kept short with the commands' own flags (``--max-prompts``, ``--limit``,
``--max-steps``), not with different code. Every folder written must load with plain
``transformers`` and give finite logits; every effects file must be finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from biaslens.cli import main

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("one_thread")]

#: family id -> tiny_model keyword arguments
MODELS = {
    "gpt2": {"family": "gpt2"},
    "neox": {"family": "neox"},
    "opt": {"family": "opt"},
    "llama-gqa-sp": {"family": "llama"},
    "gpt2-64pos": {"family": "gpt2", "positions": 64},
}
QUICK = ["--limit", "8"]


@pytest.fixture(scope="module", params=list(MODELS))
def user_model(request, tmp_path_factory) -> tuple[str, Path]:
    from biaslens.testing import tiny_model

    root = tmp_path_factory.mktemp(request.param)
    return request.param, tiny_model(folder=root / "model", **MODELS[request.param])


@pytest.fixture(scope="module")
def work(user_model, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(f"{user_model[0]}-out")


def run(*argv: str) -> None:
    rc = main([str(a) for a in argv])
    assert rc == 0, f"biaslens {' '.join(map(str, argv))} exited {rc}"


def strict_json(path: Path):
    """JSON as the standard defines it: NaN and Infinity are refused."""
    def refuse(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def all_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from all_numbers(v)


def check_contrast(c: dict) -> None:
    """The headline, the stereotype contrast (src/evaluate/contrast.py): finite, with CIs and
    one row per template."""
    assert math.isfinite(c["mean_abs_contrast"]) and 0 <= c["mean_abs_contrast"] <= 1
    lo, hi = c["ci"]["mean_abs_contrast"]
    assert lo is not None and hi is not None and lo <= c["mean_abs_contrast"] + 1e-12 <= hi + 2e-12
    assert len(c["per_template"]) == c["n"] >= 2
    assert all(math.isfinite(v) for v in c["per_template"].values())


def loads_in_transformers(folder: Path) -> None:
    """The folder is a Hugging Face model any ``transformers`` user can load and run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok("The nurse said that she would be late.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = hf(ids).logits
    assert logits.shape[-1] >= len(tok) - 1 and torch.isfinite(logits).all()


def test_info(user_model, capsys):
    _, folder = user_model
    run("info", folder, "--json")
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 2 and info["d_model"] == 32
    if MODELS[user_model[0]]["family"] == "llama":
        assert info["kv_heads"] == 2 and info["heads"] == 4  # grouped-query attention


@pytest.mark.parametrize("method", ["noise", "swap", "attribution"])
def test_locate_with_default_prompts(user_model, work, method):
    _, folder = user_model
    out = work / f"locate-{method}"
    run("locate", "--model", folder, "--method", method, "--max-prompts", 6, "--samples", 2, "--out", out)
    effects = strict_json(out / "effects.json")
    numbers = list(all_numbers(effects))
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert effects["n_prompts"] == 6
    assert (out / "heatmap.html").stat().st_size > 10_000


@pytest.mark.parametrize("method", ["lsdm", "rome", "cda"])
def test_edit_with_defaults(user_model, work, method):
    _, folder = user_model
    effects = work / "locate-noise" / "effects.json"
    if not effects.exists():  # this test selected on its own
        run("locate", "--model", folder, "--max-prompts", 6, "--samples", 2, "--out", effects.parent)
    out = work / f"edit-{method}"
    site = ["--layers", "0"] if method == "cda" else ["--effects", effects]
    run("edit", "--method", method, "--model", folder, *site, "--max-prompts", 12, *QUICK,
        "--quiet", "--out", out)
    report = strict_json(out / "report.json")
    for key in ("contrast_test", "contrast_edit", "occupations", "occupations_heldout_templates",
                "definitional", "perplexity"):
        assert key in report["before"] and key in report["after"]
    for when in ("before", "after"):
        check_contrast(report[when]["contrast_test"])
    top = report["summary"]["contrast_test.mean_abs_contrast"]
    assert list(report["summary"])[0] == "contrast_test.mean_abs_contrast"
    assert len(top["per_template"]) == top["n"] and len(top["ci"]["cut"]) == 2
    manifest = strict_json(out / "model" / "manifest.json")
    changed = {t["name"] for t in manifest["changed_tensors"]}
    assert changed and all(".mlp." in n or "fc2" in n for n in changed)  # MLP output weights only
    loads_in_transformers(out / "model")


@pytest.mark.parametrize("method", ["pcgu", "task-vector", "offset", "masked-ascent"])
def test_unlearn_with_defaults(user_model, work, method):
    _, folder = user_model
    out = work / f"unlearn-{method}"
    run("unlearn", "--method", method, "--model", folder, "--max-prompts", 12, "--max-steps", 2,
        *QUICK, "--out", out)
    report = strict_json(out / "report.json")
    assert report["data"].startswith("biaslens bank")
    assert "occupations" in report["after"]
    for when in ("before", "after"):
        check_contrast(report[when]["contrast_test"])
    # a random model has no bias to remove: validation may keep the start, and then says so
    assert report["changed"] or "changed no weight" in report["note"]
    folders = [out / "base", out / "offset"] if method == "offset" else [out]
    for f in folders:
        loads_in_transformers(f)


def test_evaluate_ships_every_benchmark(user_model, work):
    _, folder = user_model
    out = work / "eval.json"
    run("evaluate", "--model", folder, "--limit", 12, "--max-tokens", 600, "--json", out)
    res = strict_json(out)
    assert set(res["benchmarks"]) >= {"contrast_test", "contrast_edit", "contrast_validation",
                                      "occupations", "stereoset", "crows", "winobias", "winogender",
                                      "perplexity", "knowledge"}
    assert list(res["benchmarks"])[0] == "contrast_test"
    check_contrast(res["benchmarks"]["contrast_test"])
    assert math.isfinite(res["benchmarks"]["perplexity"]["perplexity"])


def test_export_and_demo(user_model, work):
    _, folder = user_model
    run("export", "--model", folder, "--out", work / "export")
    loads_in_transformers(work / "export")
    run("demo", "--model", folder, "--max-prompts", 6, "--edit-prompts", 12, *QUICK, "--out", work / "demo")
    assert "Headline: the stereotype contrast" in (work / "demo" / "report.html").read_text()
    rep = strict_json(work / "demo" / "report.json")
    check_contrast(rep["before"]["contrast_test"])
    check_contrast(rep["after"]["contrast_test"])
    assert rep["headline"]["benchmark"] == "contrast_test" and len(rep["headline"]["ci"]["cut"]) == 2
    assert len(rep["per_template_contrast"]["contrast_test"]) == rep["headline"]["n"]
    loads_in_transformers(work / "demo" / "model")
    numbers = list(all_numbers(strict_json(work / "demo" / "effects.json")))
    assert all(math.isfinite(x) for x in numbers)
