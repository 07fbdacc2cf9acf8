"""``biaslens unlearn``: bad input ends in exit 2 with one line; a run writes the folder and report."""

from __future__ import annotations

import json
import math

import pytest

from biaslens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _fails(capsys, argv, needle):
    code = main(["unlearn", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["--method", "erase", "--model", "organism"], "unknown --method 'erase'"),
    (["--method", "pcgu", "--model", "organism", "--max-steps", "0"], "--max-steps must be a positive"),
    (["--method", "task-vector", "--model", "organism", "--pairs", "no/such.jsonl"], "does not exist"),
    (["--method", "task-vector", "--model", "organism", "--lora-rank", "0"], "--lora-rank must be a positive"),
    (["--method", "pcgu", "--model", "organism", "--small-model", "organism"], "only used by --method offset"),
    (["--method", "offset", "--model", "organism", "--loss", "forget"], "unknown --loss 'forget'"),
])
def test_bad_arguments(capsys, tmp_path, argv, needle):
    _fails(capsys, [*argv, "--out", str(tmp_path / "o")], needle)


def test_non_empty_out_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["--method", "task-vector", "--model", "organism", "--out", str(out)], "not empty")
    assert (out / "keep.txt").read_text() == "mine"


def test_malformed_data_file(capsys, tmp_path, tiny_dirs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "The nurse said that she left.", "spans": [[0, 999]]}\n')
    _fails(capsys, ["--method", "masked-ascent", "--model", str(tiny_dirs["gpt2"]), "--pairs", str(bad),
                    "--out", str(tmp_path / "o")], "line 1")


def test_missing_model_folder(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "The nurse said that she left."}\n')
    _fails(capsys, ["--method", "masked-ascent", "--model", str(tmp_path / "nope") + "/", "--pairs", str(f),
                    "--out", str(tmp_path / "o")], "does not exist")


def test_masked_ascent_run_on_span_file(capsys, tmp_path, tiny_dirs):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in [
        "The nurse said that she left.", "The engineer said that he left.", "The clerk lost her keys."]) + "\n")
    out = tmp_path / "o"
    code = main(["unlearn", "--method", "masked-ascent", "--model", str(tiny_dirs["gpt2"]), "--pairs", str(f),
                 "--max-steps", "2", "--lr", "1e-3", "--ppl-bound", "1000", "--limit", "20", "--max-prompts", "60",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["method"] == "masked-ascent" and report["n_forget"] == 3
    # the headline leads the printed summary: the contrast on held-out templates, with the cut's CI
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    head = next(i for i, ln in enumerate(lines) if "headline:" in ln)
    assert "stereotype contrast on held-out templates" in lines[head] and "cut" in lines[head]
    assert head < next(i for i, ln in enumerate(lines) if "occupational gap" in ln)
    for when in ("before", "after"):  # a user's model gets it on the shipped bank
        c = report[when]["contrast_test"]
        assert math.isfinite(c["mean_abs_contrast"]) and c["ci"]["mean_abs_contrast"]
        assert len(c["per_template"]) == c["n"] >= 2 and c["n_prompts"] <= 20
    if not report["changed"]:  # validation kept the start: the report and stderr say so
        assert report["info"]["chosen"]["step"] == 0 and not manifest["changed_tensors"]
        assert "changed no weight" in report["note"] and "changed no weight" in printed.err
        return
    assert report["info"]["chosen"]["step"] > 0 and report["note"] is None
    assert report["data"] == str(f)
    for when in ("before", "after"):  # the model's default suite: a user's model gets the shipped probes
        assert {"occupations", "definitional", "perplexity"} <= set(report[when])
    assert manifest["method"] == "masked-span-ascent" and manifest["changed_tensors"]
    assert (out / "model.safetensors").exists() and (out / "delta.safetensors").exists()


def test_a_result_that_changed_nothing_says_so(tiny_dirs):
    """A method whose best state is the start (ΔW = 0) is reported as unchanged."""
    import biaslens
    import torch

    from biaslens.unlearn.cli import unchanged_note

    m = biaslens.load(tiny_dirs["gpt2"])
    name = m.mlp_out_name(0)
    snap = m.snapshot([name])
    unchanged = m.delta_since(snap, method="masked-span-ascent", info={"chosen": {"step": 0}})
    note = unchanged_note(unchanged, "masked-ascent")
    assert "changed no weight" in note and "step 0" in note and "equal the base model" in note
    with torch.no_grad():
        m.param(name)[0, 0] += 1.0
    assert unchanged_note(m.delta_since(snap, method="masked-span-ascent"), "masked-ascent") is None
