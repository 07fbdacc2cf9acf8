"""The hooked-model abstraction: loading, logits equal to HF, token roles, weights, export."""

from __future__ import annotations

import json

import pytest
import torch

import biaslens
from biaslens.errors import BiasLensError, ExportError, ModelLoadError, VocabularyError
from biaslens.export import export
from conftest import ARCHS


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {a: biaslens.load(str(d)) for a, d in tiny_dirs.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(arch, models, tiny_dirs):
    from transformers import AutoModelForCausalLM

    m = models[arch]
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], attn_implementation="eager").eval()
    b = m.encode(["The nurse said that", "The electrician was promoted because"])
    with torch.no_grad():
        ours = m.forward(b)
        ref = hf(b.input_ids, attention_mask=b.attention_mask).logits
    mask = b.attention_mask.bool()
    assert (ours[mask] - ref[mask]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_positions_equal_the_full_logits(arch, models):
    """Scoring unembeds only the positions it reads (``logits_to_keep``): the last-token logits,
    any boolean set of positions, and score_rows' log-probabilities and argmax flags equal those
    read off the full ``[batch, pos, vocab]`` logits."""
    from biaslens.evaluate.scoring import score_rows

    m = models[arch]
    texts = ["The nurse said that she would be late.", "The electrician was promoted because",
             "A clerk"]
    b = m.encode(texts)
    with torch.no_grad():
        full = m.forward(b)
        rows = torch.arange(len(texts))
        assert torch.allclose(m.last_logits(b), full[rows, b.lengths - 1], atol=1e-5)
        keep = b.attention_mask.bool().clone()
        keep[0, 2] = False
        got = m.logits_at(b.input_ids, keep, attention_mask=b.attention_mask)
        assert got.shape == (int(keep.sum()), full.shape[-1])
        assert torch.allclose(got, full[keep], atol=1e-5)
    ids = [b.input_ids[i, : b.lengths[i]].tolist() for i in range(len(texts))]
    starts, ends = [1, 3, 1], [len(ids[0]), len(ids[1]) - 1, len(ids[2])]
    scores = score_rows(m, ids, starts, ends, batch_size=2, greedy=True)
    lp = torch.log_softmax(full.float(), -1)
    for i, r in enumerate(ids):
        ref = [lp[i, t - 1, r[t]].item() for t in range(starts[i], ends[i])]
        top = [int(lp[i, t - 1].argmax()) == r[t] for t in range(starts[i], ends[i])]
        assert scores.logprobs[i] == pytest.approx(ref, abs=1e-5)
        assert scores.greedy[i].tolist() == top


@pytest.mark.parametrize("arch", ARCHS)
def test_roles_multi_token_subject(arch, models):
    m = models[arch]
    text, subject = "The paralegal said that", "paralegal"
    b = m.encode([(text, subject), ("The nurse said that", "nurse")])
    ids = b.input_ids[0, : b.lengths[0]].tolist()
    first, last = b.roles["subject_first"][0][0], b.roles["subject_last"][0][0]
    assert last > first, "paralegal splits into several GPT-2 BPE tokens"
    decoded = m.tokenizer.decode(ids[first : last + 1])
    assert decoded.strip() == subject
    assert b.roles["subject_middle"][0] == list(range(first + 1, last))
    assert b.roles["last"][0] == [len(ids) - 1]
    assert m.tokenizer.decode([ids[-1]]) == " that"
    # the one-token subject: first == last, prompts of different length align by role
    assert b.roles["subject_first"][1] == b.roles["subject_last"][1]
    assert m.tokenizer.decode([b.input_ids[1, b.roles["subject_first"][1][0]]]) == " nurse"
    assert b.index("last").tolist() == [int(b.lengths[0]) - 1, int(b.lengths[1]) - 1]


def test_target_logprobs_multi_token_equals_chain_rule(models):
    m = models["gpt2"]
    b = m.encode(["The nurse said that"])
    word = " paralegal"
    ids = m.word_ids(word)
    assert len(ids) > 1
    got = m.target_logprobs(b, [word, " she"])
    seq = torch.tensor([b.input_ids[0].tolist() + ids])
    with torch.no_grad():
        lp = torch.log_softmax(m.forward(seq), -1)[0]
    L = int(b.lengths[0])
    want = sum(lp[L - 1 + t, ids[t]] for t in range(len(ids)))
    assert abs(got[0, 0].item() - want.item()) < 1e-4
    assert abs(got[0, 1].item() - lp[L - 1, m.single_token(" she")].item()) < 1e-5


def test_word_errors(models):
    m = models["gpt2"]
    with pytest.raises(VocabularyError, match="tokens"):
        m.single_token(" paralegal")
    with pytest.raises(VocabularyError, match="vocabulary"):
        m.word_ids("")


def test_missing_path_and_offline_hub():
    with pytest.raises(ModelLoadError, match="does not exist"):
        biaslens.load("./no/such/model")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        biaslens.load("EleutherAI/pythia-14m-not-a-model")


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_map_points_at_real_weights(arch, models):
    m = models[arch]
    W = m.mlp_out_matrix(1)
    assert tuple(W.shape) == (m.d_model, m.d_mlp)
    b = m.encode(["The nurse said that"])
    _, cache = m.run_with_cache(b, [m.hook_name("mlp_key", 1), m.hook_name("mlp_out", 1)])
    key, out = cache[m.hook_name("mlp_key", 1)][0], cache[m.hook_name("mlp_out", 1)][0]
    bias_name = m.mlp_out_name(1).replace(".weight", ".bias")
    bias = m.params[bias_name] if bias_name in m.params else 0
    assert torch.allclose(key @ W.T + bias, out, atol=1e-5)
    if arch == "llama":
        assert m.n_kv_heads == 2 and m.n_heads == 4


def test_snapshot_delta_undo(models):
    m = models["opt"]
    name = m.mlp_out_name(0)
    before_hash = m.weight_hash()
    snap = m.snapshot([name, m.mlp_out_name(1)])
    with torch.no_grad():
        m.mlp_out_matrix(0)[0, 0] += 1.0
    d = m.delta_since(snap, method="test")
    assert d.names == [name]
    assert d.stats()[0]["changed_entries"] == 1
    assert m.weight_hash() != before_hash
    d.undo(m)
    assert m.weight_hash() == before_hash
    d.apply(m)
    assert m.weight_hash() != before_hash
    d.undo(m)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip(arch, models, tmp_path):
    from transformers import AutoModelForCausalLM

    m = models[arch]
    name = m.mlp_out_name(1)
    snap = m.snapshot([name])
    with torch.no_grad():
        m.mlp_out_matrix(1).mul_(1.5)
    delta = m.delta_since(snap, method="scale", hparams={"factor": 1.5})
    out = export(m, tmp_path / "out", delta=delta)
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    b = m.encode(["The nurse said that she"])
    with torch.no_grad():
        diff = (m.forward(b) - hf(b.input_ids).logits).abs().max().item()
    assert diff <= 1e-5
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "scale" and [t["name"] for t in man["changed_tensors"]] == [name]
    assert man["base_model"]["weight_sha256"] != man["weight_sha256"]
    from biaslens.delta import load_delta

    dd = load_delta(out / "delta.safetensors")
    assert list(dd) == [name] and torch.allclose(dd[name], delta.diff(name))
    delta.undo(m)
    assert m.weight_hash() == man["base_model"]["weight_sha256"]


def test_export_refuses_existing_and_nonfinite(models, tmp_path):
    m = models["gpt2"]
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="not empty"):
        export(m, out)
    assert (out / "keep.txt").read_text() == "precious"
    name = m.mlp_out_name(0)
    snap = m.snapshot([name])
    with torch.no_grad():
        m.mlp_out_matrix(0)[0, 0] = float("nan")
    try:
        with pytest.raises(ExportError, match="NaN"):
            export(m, tmp_path / "nan")
        assert not (tmp_path / "nan").exists()
    finally:
        m.restore(snap)


def test_cli_errors(tmp_path, capsys):
    from biaslens.cli import main

    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", "--model", "organism", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
