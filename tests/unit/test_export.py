"""Export verification: the reloaded folder is checked against the in-memory plain HF module
(not the TransformerLens bridge), in float32, float16 and bfloat16; NaN is refused; the manifest
is strict JSON with the verification numbers.

The models are tiny random GPT-2s with a small byte-level BPE trained here with ``tokenizers``,
so these tests need no data files and no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import biaslens
from biaslens.errors import ExportError
from biaslens.export import PROBE_TEXT, _probe_ids, dumps_manifest, export, tolerance

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [
    "The river runs past the old mill, and in 1987 the town had 4,200 people.",
    "The nurse said that she would be late, so the doctor waited for her.",
    "A teacher and an engineer walked home together after the long meeting.",
    "Prices rose by 3.5% last year; most families spent more on food and rent.",
]
EOT = "<|endoftext|>"


def _tokenizer(bos: bool = True):
    """A ~350-token byte-level BPE (GPT-2 style) trained offline on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 4, trainer=trainer)
    if bos:
        return GPT2TokenizerFast(tokenizer_object=tk, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOT, unk_token=EOT)  # no BOS


def _gpt2(folder: Path, scale: float = 1.0, n_embd: int = 32, seed: int = 0, bos: bool = True) -> Path:
    """Save a random 2-layer GPT-2 whose tied embedding is multiplied by ``scale``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(bos)
    eot = tok.convert_tokens_to_ids(EOT)
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=2, n_head=4, vocab_size=len(tok),
                                   n_positions=64, bos_token_id=eot, eos_token_id=eot))
    with torch.no_grad():
        m.transformer.wte.weight.mul_(scale)
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path.name} holds {name}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _logits(module, ids):
    with torch.no_grad():
        return module(ids).logits


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return _gpt2(tmp_path_factory.mktemp("export") / "plain")


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory):
    # Embedding x1000: max |logit| ~ 800, where the bridge's float32 logits are ~1e-4 from HF's.
    return _gpt2(tmp_path_factory.mktemp("export") / "large", scale=1000.0)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    # n_embd 128, embedding x30: max |logit| ~ 90; the bridge's float16 / bfloat16 logits are
    # ~0.016 / ~0.125 from HF's here (the 32-wide model's happen to be identical).
    return _gpt2(tmp_path_factory.mktemp("export") / "wide", scale=30.0, n_embd=128)


def test_large_logits_export_is_not_refused(large_dir, tmp_path):
    m = biaslens.load(str(large_dir))
    ids = _probe_ids(m)
    hf = _logits(m.plain_module(), ids)
    with torch.no_grad():
        bridge = m.forward(ids)
    assert float(hf.abs().max()) > 100
    # The old check (bridge vs reloaded at atol 1e-5) refused exactly this model.
    assert float((bridge - hf).abs().max()) > 1e-5
    out = export(m, tmp_path / "out")
    got = _logits(_reload(out), ids)
    assert torch.equal(got, hf)  # same code, same weights: bit-identical
    v = _strict_json(out / "manifest.json")["verification"]
    assert v["reloaded_vs_hf_max_abs"] == 0.0
    assert v["bridge_vs_hf_max_abs"] > 1e-5  # recorded, not refused
    assert v["tolerance"] == pytest.approx(tolerance(torch.float32, v["logits_max_abs"]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export_reloads_in_its_dtype(dtype, wide_dir, tmp_path):
    tdtype = getattr(torch, dtype)
    m = biaslens.load(str(wide_dir), dtype=dtype)
    assert m.dtype == tdtype
    name = m.mlp_out_name(1)
    snap = m.snapshot([name])
    with torch.no_grad():
        m.mlp_out_matrix(1).mul_(1.5)
    delta = m.delta_since(snap, method="scale", hparams={"factor": 1.5})
    out = export(m, tmp_path / dtype, delta=delta)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    hf = _reload(out)  # as any transformers user loads it: no dtype given
    assert hf.dtype == tdtype
    for n, p in m.params.items():
        assert torch.equal(hf.state_dict()[n], p.detach()), n
    ids = _probe_ids(m)
    assert torch.equal(_logits(hf, ids), _logits(m.plain_module(), ids))
    man = _strict_json(out / "manifest.json")
    assert man["dtype"] == dtype and man["verification"]["dtype"] == dtype
    assert man["verification"]["reloaded_vs_hf_max_abs"] == 0.0
    assert isinstance(man["verification"]["bridge_vs_hf_max_abs"], float)  # information only
    assert [t["name"] for t in man["changed_tensors"]] == [name]
    again = biaslens.load(str(out), dtype=dtype)  # and biaslens reads it back
    assert again.weight_hash() == m.weight_hash() == man["weight_sha256"]


def test_nan_weight_is_refused_and_nothing_written(plain_dir, tmp_path):
    m = biaslens.load(str(plain_dir))
    with torch.no_grad():
        m.mlp_out_matrix(0)[0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN"):
        export(m, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="NaN"):
        export(m, keep, force=True)
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folders left


def test_nonfinite_logits_are_refused(plain_dir, tmp_path):
    # Finite float16 weights whose activations overflow: ln_f's gain at 60000 sends logits to inf.
    m = biaslens.load(str(plain_dir), dtype="float16")
    with torch.no_grad():
        m.param("transformer.ln_f.weight").fill_(60000.0)
    assert not m.check_finite()
    with pytest.raises(ExportError, match="NaN or inf"):
        export(m, tmp_path / "inf")
    assert not (tmp_path / "inf").exists() and not list(tmp_path.iterdir())


def test_manifest_is_strict_json_with_verification(plain_dir, tmp_path):
    import numpy as np

    m = biaslens.load(str(plain_dir))
    extra = {"metrics": {"perplexity": float("inf"), "gap": float("nan"), "acc": np.float32(0.5),
                         "per_layer": torch.tensor([1.0, float("nan")]), "where": tmp_path / "x"}}
    out = export(m, tmp_path / "out", manifest=extra)
    man = _strict_json(out / "manifest.json")
    assert man["metrics"] == {"perplexity": None, "gap": None, "acc": 0.5, "per_layer": [1.0, None],
                              "where": str(tmp_path / "x")}
    v = man["verification"]
    for k in ("reloaded_vs_hf_max_abs", "tolerance", "bridge_vs_hf_max_abs", "logits_max_abs"):
        assert isinstance(v[k], float) and v[k] >= 0, k
    assert v["reloaded_vs_hf_max_abs"] <= v["tolerance"] and v["tensors_bit_exact"] is True
    assert v["probe_tokens"] >= 5
    off = export(m, tmp_path / "unverified", verify=False)
    assert _strict_json(off / "manifest.json")["verification"] is None
    cleaned = json.loads(dumps_manifest({"x": float("-inf"), "y": (1, 2)}))
    assert {k: cleaned[k] for k in ("x", "y")} == {"x": None, "y": [1, 2]}
    assert cleaned["nonfinite"]["count"] == 1 and cleaned["nonfinite"]["paths"] == ["x = -inf"]


def test_probe_ids_without_bos(tmp_path):
    d = _gpt2(tmp_path / "nobos", bos=False)
    m = biaslens.load(str(d))
    m.tokenizer.bos_token = None  # the bridge gives a BOS-less tokenizer one; take it away again
    assert m.tokenizer.bos_token_id is None
    for prepend in (False, True):  # True: asked for, but there is no BOS: no None, no crash
        m.prepend_bos = prepend
        ids = _probe_ids(m)
        assert ids.dtype == torch.long and ids.shape[0] == 1 and ids.shape[1] >= 5
        assert ids.tolist()[0] == m.tokenizer(PROBE_TEXT)["input_ids"][: ids.shape[1]]
    out = export(m, tmp_path / "out")
    assert _strict_json(out / "manifest.json")["verification"]["reloaded_vs_hf_max_abs"] == 0.0


def test_probe_ids_with_bos(plain_dir):
    m = biaslens.load(str(plain_dir))
    assert m.prepend_bos
    ids = _probe_ids(m)
    assert ids[0, 0].item() == m.tokenizer.bos_token_id
    assert ids[0, 1].item() != m.tokenizer.bos_token_id


def test_preflight_fails_fast_on_what_export_would_refuse(plain_dir):
    from biaslens.export import preflight

    m = biaslens.load(str(plain_dir), dtype="float16")
    preflight(m)  # a healthy float16 model: nothing to refuse
    with torch.no_grad():
        m.param("transformer.ln_f.weight").fill_(60000.0)
    with pytest.raises(ExportError, match="NaN or inf"):
        preflight(m)
