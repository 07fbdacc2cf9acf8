"""``biaslens edit``: exported folder + report with before/after metrics; bad input exits 2."""

from __future__ import annotations

import json
import math

import pytest

from biaslens import organism
from biaslens.cli import main
from biaslens.defaults import templates

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit_cli")
    (d / "general.txt").write_text("\n".join(organism.generate_general_text(seed=4, n_lines=120)) + "\n")
    (d / "occ.txt").write_text("# occupation, percent female\nnurse,89.6\nplumber,0.7\nteacher\n")
    (d / "hp.json").write_text(json.dumps({"cov_tokens": 800, "cov_seq_len": 64, "v_steps": 2,
                                           "v_newton_steps": 1, "mom2_weight": 1e-3}))
    (d / "cda.json").write_text(json.dumps({"epochs": 1, "batch_size": 16}))
    return d


def common(files, tiny_dirs, out):
    return ["--model", str(tiny_dirs["gpt2"]), "--corpus", str(files / "general.txt"),
            "--occupations", str(files / "occ.txt"), "--cache-dir", str(files / "cache"),
            "--limit", "40", "--out", str(out), "--quiet"]


def test_edit_writes_model_and_report(files, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["edit", "--method", "lsdm", "--layers", "0,1", "--role", "subject_last",
            "--hparams", str(files / "hp.json")] + common(files, tiny_dirs, out)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["site"] == {"layers": [0, 1], "role": "subject_last", "source": "explicit"}
    assert report["hyperparameters"]["cov_tokens"] == 800
    n_edit_templates = len(templates("edit"))  # a user's model edits with the bank's templates
    for when in ("before", "after"):
        assert report[when]["occupations_train"]["n"] == 3 * n_edit_templates
        assert report[when]["perplexity_corpus"]["perplexity"] > 1
        # the headline: the contrast on held-out templates (default prompts, --limit sample) ...
        head = report[when]["contrast_test"]
        assert math.isfinite(head["mean_abs_contrast"]) and head["n_prompts"] <= 40
        assert len(head["per_template"]) == head["n"] >= 2 and head["ci"]["mean_abs_contrast"]
        # ... and on the user's occupations (nurse, plumber; teacher has no side) × edit templates
        own = report[when]["contrast_edit"]
        assert own["n"] == n_edit_templates and own["n_prompts"] == 3 * n_edit_templates
        assert own["split"] == "the edit prompts x edit templates"
    summ = report["summary"]
    assert list(summ)[0] == "contrast_test.mean_abs_contrast"
    top = summ["contrast_test.mean_abs_contrast"]
    assert top["before"] == report["before"]["contrast_test"]["mean_abs_contrast"]
    assert top["after"] == report["after"]["contrast_test"]["mean_abs_contrast"]
    assert math.isfinite(top["cut"]) and len(top["ci"]["cut"]) == 2
    assert len(top["per_template"]) == top["n"]
    assert {"occupations_heldout_templates.mean_abs_gap", "definitional.accuracy",
            "perplexity.perplexity"} <= set(summ)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("contrast_test.mean_abs_contrast") and "cut" in printed[0]
    assert {c["name"] for c in report["changed_tensors"]} == {
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"}
    # where the time went: every phase of the command, wall seconds; inside the edit the keep
    # weight was tuned (hp.json names none) but the site was given, so nothing was traced
    assert set(report["seconds"]) == {"load", "measure_before", "edit", "measure_after"}
    assert all(math.isfinite(v) and v >= 0 for v in report["seconds"].values())
    inner = report["diagnostics"]["seconds"]
    assert report["diagnostics"]["tuning"]["tuned"] == ["keep_weight"]
    assert inner["site_map"] < 0.1 and 0 < inner["tuning"] < report["seconds"]["edit"]
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["method"] == "lsdm" and manifest["site"]["layers"] == [0, 1]
    assert (out / "model" / "delta.safetensors").exists()
    # the folder exists now: refused without --force, one line, exit 2
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]


@pytest.mark.slow  # ~30 s: the CDA default data includes every definitional prompt
def test_cda_baseline_through_the_cli(files, tiny_dirs, tmp_path):
    out = tmp_path / "cda"
    argv = ["edit", "--method", "cda", "--layers", "1", "--hparams", str(files / "cda.json")] + \
        common(files, tiny_dirs, out)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "cda" and report["site"]["layers"] == [1]


@pytest.mark.parametrize("extra, msg", [
    (["--layers", "one,two"], "comma-separated"),
    (["--layers", "9", "--role", "last"], "out of range"),
    (["--layers", "1", "--role", "prefix"], "role"),
])
def test_bad_input_exits_2_with_one_line(extra, msg, files, tiny_dirs, tmp_path, capsys):
    argv = ["edit"] + extra + common(files, tiny_dirs, tmp_path / "bad")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "bad" / "model").exists()


def test_bad_occupations_file(files, tiny_dirs, tmp_path, capsys):
    bad = tmp_path / "occ.txt"
    bad.write_text("nurse,lots\n")
    argv = ["edit", "--layers", "1", "--role", "last"] + common(files, tiny_dirs, tmp_path / "o")
    argv[argv.index("--occupations") + 1] = str(bad)
    assert main(argv) == 2
    assert "occ.txt:1" in capsys.readouterr().err
