"""Bad input at the boundary: every case exits 2 with one line naming the problem, no traceback,
and writes nothing; plus the library checks behind them (hyperparameters, strict loading, undo,
vocabulary, effect-map identity). Small random models only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from biaslens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _refused(capsys, argv, needle, out: Path | None = None) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{out} was written"
    return lines[0]


@pytest.fixture(scope="module")
def sp_llama(tmp_path_factory) -> Path:
    """A tiny LLaMA with its SentencePiece-style tokenizer (no byte tokens: emoji are <unk>)."""
    from biaslens.testing import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("sp") / "llama")


@pytest.fixture
def gpt2_copy(tiny_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dirs["gpt2"], tmp_path / "gpt2"))


# ------------------------------------------------------------------- numeric flags (argparse)
M = "organism"  # never loaded: the parser refuses first
FLAG_CASES = [
    (["locate", "--model", M, "--samples", "0"], "--samples"),
    (["locate", "--model", M, "--samples", "3.5"], "--samples"),
    (["locate", "--model", M, "--noise-scale", "nan"], "--noise-scale"),
    (["locate", "--model", M, "--noise-scale", "0"], "--noise-scale"),
    (["locate", "--model", M, "--noise-scale", "1e30"], "--noise-scale"),
    (["locate", "--model", M, "--max-prompts", "-1"], "--max-prompts"),
    (["locate", "--model", M, "--window", "0"], "--window"),
    (["locate", "--model", M, "--top-n", "0"], "--top-n"),
    (["locate", "--model", M, "--seed", "-1"], "--seed"),
    (["edit", "--model", M, "--max-prompts", "0"], "--max-prompts"),
    (["edit", "--model", M, "--limit", "-3"], "--limit"),
    (["unlearn", "--method", "offset", "--model", M, "--alpha", "nan"], "--alpha"),
    (["unlearn", "--method", "offset", "--model", M, "--alpha", "1e30"], "--alpha"),
    (["unlearn", "--method", "offset", "--model", M, "--alpha", "inf"], "--alpha"),
    (["unlearn", "--method", "pcgu", "--model", M, "--ppl-bound", "nan"], "--ppl-bound"),
    (["unlearn", "--method", "pcgu", "--model", M, "--ppl-bound", "0.5"], "--ppl-bound"),
    (["unlearn", "--method", "pcgu", "--model", M, "--lr", "0"], "--lr"),
    (["unlearn", "--method", "pcgu", "--model", M, "--lr=-inf"], "--lr"),
    (["unlearn", "--method", "pcgu", "--model", M, "--max-steps", "two"], "--max-steps"),
    (["unlearn", "--method", "task-vector", "--model", M, "--lora-rank", "-1"], "--lora-rank"),
    (["unlearn", "--method", "pcgu", "--model", M, "--max-prompts", "-1"], "--max-prompts"),
    (["unlearn", "--method", "pcgu", "--model", M, "--limit", "0"], "--limit"),
    (["demo", "--model", M, "--max-prompts", "0"], "--max-prompts"),
    (["demo", "--model", M, "--edit-prompts", "-1"], "--edit-prompts"),
    (["demo", "--model", M, "--limit", "nan"], "--limit"),
    (["demo", "--model", M, "--layers", "1,x"], "--layers"),
]


@pytest.mark.parametrize("argv, flag", FLAG_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_bad_number_flag(argv, flag, capsys, tmp_path):
    out = tmp_path / "out"
    line = _refused(capsys, [*argv, "--out", out], flag, out)
    assert line.startswith(f"biaslens {argv[0]}: error: {flag} must be"), line


@pytest.mark.parametrize("argv, flag", [
    (["--limit", "-3"], "--limit"), (["--max-tokens", "1"], "--max-tokens"),
    (["--batch-size", "0"], "--batch-size"), (["--threads", "0"], "--threads"),
])
def test_bad_evaluate_flag(argv, flag, capsys, tmp_path):
    js = tmp_path / "r.json"
    _refused(capsys, ["evaluate", "--model", M, *argv, "--json", js], flag)
    assert not js.exists()


def test_good_numbers_still_parse():
    from biaslens.cli import build_parser

    a = build_parser().parse_args(["unlearn", "--method", "offset", "--model", M, "--alpha", "-2.5",
                                   "--ppl-bound", "1", "--lr", "1e-4", "--out", "x"])
    assert (a.alpha, a.ppl_bound, a.lr) == (-2.5, 1.0, 1e-4)
    a = build_parser().parse_args(["locate", "--model", M, "--max-prompts", "0", "--out", "x"])
    assert a.max_prompts == 0  # documented: 0 = all


def test_hand_built_namespace_checked(capsys):
    """``_check_args`` repeats the parser's checks for a namespace built without it."""
    from biaslens.cli import build_parser
    from biaslens.errors import BiasLensError
    from biaslens.unlearn.cli import _check_args

    a = build_parser().parse_args(["unlearn", "--method", "offset", "--model", M, "--out", "x"])
    a.alpha = float("nan")
    with pytest.raises(BiasLensError, match="--alpha"):
        _check_args(a)


# ---------------------------------------------------------------- files and models via the CLI
def test_hparams_file_errors(tmp_path, capsys, tiny_dirs):
    common = ["--model", tiny_dirs["gpt2"], "--layers", "0", "--role", "last", "--limit", "2",
              "--max-prompts", "2", "--quiet"]
    for i, (content, needle) in enumerate([
        ('{"keep_weight": NaN, "mom2_weight": NaN}', "mom2_weight must be a finite number, not nan"),
        ('{"keep_weight": -1}', "keep_weight must be >= 0"),
        ('{"v_steps": "3"}', "v_steps"),
        ('{"v_stepz": 3}', "v_stepz"),
        ('{"v_steps": 3', "not valid JSON"),
    ]):
        f = tmp_path / f"hp{i}.json"
        f.write_text(content)
        out = tmp_path / f"o{i}"
        _refused(capsys, ["edit", *common, "--hparams", f, "--out", out], needle, out)
    f = tmp_path / "latin1.json"
    f.write_bytes('{"v_steps": 3, "note": "caf\xe9"}'.encode("latin-1"))
    _refused(capsys, ["edit", *common, "--hparams", f, "--out", tmp_path / "o9"], "UTF-8", tmp_path / "o9")


def test_non_utf8_prompts_and_occupations(tmp_path, capsys, tiny_dirs):
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"text": "The caf\xe9 owner said that", "subject": "owner"}\n')
    out = tmp_path / "o"
    _refused(capsys, ["locate", "--model", tiny_dirs["gpt2"], "--prompts", bad, "--out", out], "UTF-8", out)
    occ = tmp_path / "occ.txt"
    occ.write_bytes(b"nurse\ncaf\xe9 owner\n")
    _refused(capsys, ["edit", "--model", tiny_dirs["gpt2"], "--occupations", occ, "--layers", "0",
                      "--role", "last", "--out", out], "UTF-8", out)


def test_config_that_does_not_match_its_weights(gpt2_copy, capsys, tmp_path):
    import biaslens
    from biaslens.errors import ModelLoadError

    cfg = json.loads((gpt2_copy / "config.json").read_text())
    cfg["n_layer"] += 1  # the weights hold one layer fewer
    (gpt2_copy / "config.json").write_text(json.dumps(cfg))
    line = _refused(capsys, ["info", gpt2_copy], "do not match its config.json")
    assert f"transformer.h.{cfg['n_layer'] - 1}." in line and "missing" in line
    out = tmp_path / "o"
    _refused(capsys, ["locate", "--model", gpt2_copy, "--out", out], "missing", out)
    m = biaslens.load(gpt2_copy, allow_mismatch=True)  # asked for: loaded, the layer random
    assert m.n_layers == cfg["n_layer"]
    cfg["n_layer"] -= 2  # now the weights hold one layer more
    (gpt2_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not in the config"):
        biaslens.load(gpt2_copy)


def test_tied_embeddings_are_not_missing(tiny_dirs):
    import biaslens

    for arch in ("gpt2", "llama"):  # lm_head tied to the embeddings, not stored
        biaslens.load(tiny_dirs[arch])


def test_truncated_weights(gpt2_copy, capsys):
    f = gpt2_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = _refused(capsys, ["info", gpt2_copy], "model.safetensors")
    assert "truncated" in line


def test_unknown_token_occupation_and_subject(sp_llama, tiny_dirs, tmp_path, capsys):
    import biaslens
    from biaslens.edit.cli import occupation_prompts
    from biaslens.errors import VocabularyError

    occ = tmp_path / "occ.txt"
    occ.write_text("nurse,90\n\U0001F984,50\n", encoding="utf-8")
    out = tmp_path / "o"
    line = _refused(capsys, ["edit", "--model", sp_llama, "--occupations", occ, "--layers", "0",
                             "--role", "last", "--limit", "2", "--out", out], "\U0001F984", out)
    assert "--occupations" in line and "tokenizer" in line
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "The \U0001F984 said that", "subject": "\U0001F984"}) + "\n",
                       encoding="utf-8")
    _refused(capsys, ["locate", "--model", sp_llama, "--prompts", prompts, "--samples", "1",
                      "--out", out], "\U0001F984", out)
    # a byte-level BPE represents the emoji: accepted there
    gpt2 = biaslens.load(tiny_dirs["gpt2"])
    gpt2.check_words(["\U0001F984", "nurse"])
    assert len(occupation_prompts(gpt2, [("\U0001F984", 0.5, "edit")])) > 0
    llama = biaslens.load(sp_llama)
    llama.check_words(["nurse", " plumber"])
    with pytest.raises(VocabularyError, match="\U0001F984"):
        llama.check_words(["nurse", "\U0001F984"], "my words")


# --------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("cls, data, field", [
    ("LSDMHparams", {"v_steps": "3"}, "v_steps"),
    ("LSDMHparams", {"v_steps": 3.5}, "v_steps"),
    ("LSDMHparams", {"v_steps": True}, "v_steps"),
    ("LSDMHparams", {"keep_weight": float("nan")}, "keep_weight"),
    ("LSDMHparams", {"mom2_weight": float("inf")}, "mom2_weight"),
    ("LSDMHparams", {"mom2_weight": -1.0}, "mom2_weight"),
    ("LSDMHparams", {"v_lr": 0}, "v_lr"),
    ("LSDMHparams", {"v_lr": "0.1"}, "v_lr"),
    ("LSDMHparams", {"cov_tokens": 0}, "cov_tokens"),
    ("LSDMHparams", {"clamp_norm_factor": 0.0}, "clamp_norm_factor"),
    ("LSDMHparams", {"average_keys": 3}, "average_keys"),
    ("LSDMHparams", {"v_steps": 0, "v_newton_steps": 0}, "v_newton_steps"),
    ("LSDMHparams", {"seed": -1}, "seed"),
    ("ROMEHparams", {"keep_weight": -1}, "keep_weight"),
    ("CDAHparams", {"epochs": 0}, "epochs"),
    ("CDAHparams", {"lr": float("nan")}, "lr"),
    ("CDAHparams", {"max_grad_norm": 0}, "max_grad_norm"),
    ("CDAHparams", {"batch_size": "32"}, "batch_size"),
    ("CDAHparams", {"epoch": 3}, "epoch"),
])
def test_hparams_refused(cls, data, field):
    from biaslens.edit import hparams
    from biaslens.errors import DataFormatError

    with pytest.raises(DataFormatError, match=field) as info:
        getattr(hparams, cls).from_dict(data)
    assert cls in str(info.value)


def test_hparams_accepted_and_coerced(tmp_path):
    from biaslens.edit.hparams import CDAHparams, LSDMHparams

    hp = LSDMHparams.from_dict({"mom2_weight": 5, "v_steps": 0, "ridge": 0})
    assert isinstance(hp.mom2_weight, float) and hp.mom2_weight == 5.0 and hp.v_steps == 0
    assert CDAHparams(lr=1).lr == 1.0
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"keep_weight": -3}))
    from biaslens.errors import DataFormatError

    with pytest.raises(DataFormatError, match=r"h\.json.*keep_weight.*-3"):
        LSDMHparams.from_json(f)


# ---------------------------------------------------------------------------------- undo
def test_undo_checks_the_current_weights(tiny_dirs):
    import torch

    import biaslens
    from biaslens.errors import BiasLensError

    m = biaslens.load(tiny_dirs["opt"])
    base = m.weight_hash()
    n0, n1 = m.mlp_out_name(0), m.mlp_out_name(1)

    def edit(names, scale):
        snap = m.snapshot(names)
        with torch.no_grad():
            for n in names:
                m.param(n).mul_(scale)
        return m.delta_since(snap, method=f"x{scale}")

    a = edit([n0, n1], 1.5)
    b = edit([n1], 0.5)  # stacked on a, over one of its tensors
    with pytest.raises(BiasLensError, match=n1) as info:
        a.undo(m)  # out of order: b's change would be left in place
    assert n0 not in str(info.value) and "force=True" in str(info.value)
    b.undo(m)
    a.undo(m)  # in order: exact
    assert m.weight_hash() == base
    a.undo(m)  # already undone: nothing to do
    assert m.weight_hash() == base
    a.apply(m)
    b.apply(m)
    a.undo(m, force=True)  # asked for: a's originals, b's change lost
    assert m.weight_hash() == base


def test_undo_of_non_finite_edit(tiny_dirs):
    """Bitwise: an edit that wrote NaN can still be undone (NaN != NaN numerically)."""
    import torch

    import biaslens

    m = biaslens.load(tiny_dirs["gpt2"])
    base = m.weight_hash()
    n = m.mlp_out_name(0)
    snap = m.snapshot([n])
    with torch.no_grad():
        m.param(n)[0, 0] = float("nan")
    m.delta_since(snap).undo(m)
    assert m.weight_hash() == base


# --------------------------------------------------------------------- effect-map identity
def _map(n_layers: int):
    import numpy as np

    from biaslens.locate import EffectMap

    roles = ["subject_last", "last"]
    e = {"mlp": np.linspace(0, 1, n_layers * 2).reshape(n_layers, 2)}
    z = {"mlp": np.zeros((n_layers, 2))}
    return EffectMap("other", "noise", "m", 4, list(range(n_layers)), roles, e, z, z)


def test_effect_map_identity(tiny_dirs, tmp_path, capsys):
    import biaslens
    from biaslens.edit.site import resolve_site
    from biaslens.errors import BiasLensError
    from biaslens.locate import EffectMap

    m = biaslens.load(tiny_dirs["gpt2"])  # 3 layers
    old = _map(3).save(tmp_path / "old.json")  # no identity: accepted silently
    capsys.readouterr()
    assert resolve_site(m, [], "auto", "last", old)["layers"]
    assert capsys.readouterr().err == ""

    same = _map(3).stamp(m)
    path = same.save(tmp_path / "same.json")
    assert EffectMap.load(path).identity == same.identity
    resolve_site(m, [], "auto", "last", path)
    assert capsys.readouterr().err == ""

    other = _map(3)
    other.identity = {"weight_hash": "0" * 64, "n_layers": 3}
    resolve_site(m, [], "auto", "last", other.save(tmp_path / "other.json"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "other weights" in err[0]

    deeper = _map(5)
    deeper.identity = {"weight_hash": "0" * 64, "n_layers": 5}
    with pytest.raises(BiasLensError, match="5 layers"):
        resolve_site(m, [], "auto", "last", deeper.save(tmp_path / "deeper.json"))
    with pytest.raises(BiasLensError, match="5 layers"):  # explicit layers: still checked
        resolve_site(m, [], [0], "last", deeper)
    from biaslens.cli import main

    capsys.readouterr()  # through the CLI: refused before the model is measured, in one line
    rc = main(["edit", "--model", str(tiny_dirs["gpt2"]), "--effects", str(tmp_path / "deeper.json"),
               "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "5 layers" in err[0] and not (tmp_path / "e").exists()


def test_locate_stamps_its_map(tiny_dirs):
    import biaslens
    from biaslens.locate import locate

    m = biaslens.load(tiny_dirs["gpt2"])
    em = locate(m, method="attribution", components=("mlp",), max_prompts=2, n_samples=1)
    assert em.identity == {"weight_hash": m.weight_hash(), "n_layers": m.n_layers}
