"""The unlearning methods' hyperparameter dataclasses (biaslens.unlearn.hparams): loading, bad
values refused with one clear line, and a method run with ``hparams=`` equal to the same run with
keywords (tiny random GPT-2, a step or two each)."""

from __future__ import annotations

import json

import pytest
import torch

import biaslens
from biaslens.errors import BiasLensError, DataFormatError
from biaslens.prompts import Prompt
from biaslens.unlearn.hparams import MaskedAscentHparams, OffsetHparams, PCGUHparams, TaskVectorHparams

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The nurse said that she was tired.", "The engineer said that he would be back soon.",
         "The clerk forgot her keys at home.", "The plumber lost his wallet on the bus."]
PPL = ["The red box is on the table.", "It was sunny in the city on Monday."]
ALL = (PCGUHparams, TaskVectorHparams, MaskedAscentHparams, OffsetHparams)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return biaslens.load(tiny_dirs["gpt2"])


@pytest.mark.parametrize("cls", ALL)
def test_round_trip_through_dict_and_json(cls, tmp_path):
    hp = cls()
    assert cls.from_dict(hp.to_dict()) == hp
    path = tmp_path / "hp.json"
    hp.save(path)
    assert cls.from_json(path) == hp and cls.read(str(path)) == hp and cls.read(hp) is hp
    assert json.loads(path.read_text()) == hp.to_dict()  # plain JSON: sequences are lists


def test_values_are_normalised():
    assert TaskVectorHparams(lambdas=(1, 2)).lambdas == [1.0, 2.0]
    assert PCGUHparams(params=("a.weight",), ks=(5,)).params == ["a.weight"]
    assert PCGUHparams(variants=("both", "advantaged")).variants == ["both", "advantaged"]
    assert OffsetHparams(ppl_bound=2).ppl_bound == 2.0 and isinstance(OffsetHparams(ppl_bound=2).ppl_bound, float)


@pytest.mark.parametrize("cls, data, needle", [
    (PCGUHparams, {"k": 0}, "PCGUHparams.k must be >= 1"),
    (PCGUHparams, {"lrs": []}, "PCGUHparams.lrs must name at least one"),
    (PCGUHparams, {"lr": -1e-3}, "PCGUHparams.lr must be > 0"),
    (PCGUHparams, {"params": 3}, "PCGUHparams.params must be a group name"),
    (PCGUHparams, {"epochs": 1.5}, "PCGUHparams.epochs must be a whole number"),
    (PCGUHparams, {"variant": "both sides"}, "PCGUHparams.variant must be one of 'advantaged'"),
    (PCGUHparams, {"variants": []}, "PCGUHparams.variants must be a non-empty list"),
    (PCGUHparams, {"variants": "both"}, "PCGUHparams.variants must be a non-empty list"),
    (TaskVectorHparams, {"lambdas": [1.0, -1.0]}, "TaskVectorHparams.lambdas must be > 0"),
    (TaskVectorHparams, {"lora_rank": 0}, "TaskVectorHparams.lora_rank must be >= 1"),
    (TaskVectorHparams, {"ppl_bound": 0.5}, "TaskVectorHparams.ppl_bound must be >= 1"),
    (MaskedAscentHparams, {"lr": float("nan")}, "MaskedAscentHparams.lr must be a finite number"),
    (MaskedAscentHparams, {"keep_weight": -1}, "MaskedAscentHparams.keep_weight must be >= 0"),
    (OffsetHparams, {"loss": "forget"}, "OffsetHparams.loss must be one of"),
    (OffsetHparams, {"spans_only": 1}, "OffsetHparams.spans_only must be true or false"),
    (OffsetHparams, {"alphas": [0.0]}, "non-zero"),
    (OffsetHparams, {"stepz": 3}, "unknown OffsetHparams field(s) ['stepz']"),
])
def test_bad_values_are_one_clear_line(cls, data, needle):
    with pytest.raises(DataFormatError) as exc:
        cls.from_dict(data)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_bad_files_and_kinds(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"k": ')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        PCGUHparams.read(bad)
    bad.write_text('{"k": 0}')
    with pytest.raises(DataFormatError, match=r"bad.json: PCGUHparams.k must be >= 1"):
        PCGUHparams.read(bad)
    with pytest.raises(BiasLensError, match="must be a PCGUHparams, a dict or the path"):
        PCGUHparams.read(3)


def test_keywords_are_checked_before_work_and_conflicts_refused(tiny):
    from biaslens.unlearn.masked_ascent import masked_span_ascent
    from biaslens.unlearn.data import with_word_spans

    before = tiny.weight_hash()
    with pytest.raises(DataFormatError, match="MaskedAscentHparams.max_steps must be >= 1"):
        masked_span_ascent(tiny, with_word_spans(TEXTS), lr=1e-2, max_steps=0, validation=None, progress=False)
    with pytest.raises(BiasLensError, match="max_steps is given both as a keyword"):
        masked_span_ascent(tiny, with_word_spans(TEXTS), max_steps=3, hparams={"max_steps": 2}, validation=None,
                           progress=False)
    assert tiny.weight_hash() == before


def _same_delta(a, b):
    assert a.method == b.method and a.hparams == b.hparams and a.names == b.names and a.names
    for n in a.names:
        assert torch.equal(a.diff(n), b.diff(n)), n


def test_masked_ascent_hparams_equal_keywords(tiny, tmp_path):
    from biaslens.unlearn.data import with_word_spans
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    kw = {"lr": 1e-2, "max_steps": 2, "eval_every": 1, "keep_weight": 0.0, "seed": 3}
    a = masked_span_ascent(tiny, with_word_spans(TEXTS), validation=None, progress=False, **kw)
    a.undo(tiny)
    path = tmp_path / "ma.json"
    MaskedAscentHparams(**kw).save(path)
    b = masked_span_ascent(tiny, with_word_spans(TEXTS), validation=None, progress=False, hparams=path)
    b.undo(tiny)
    _same_delta(a, b)
    assert a.hparams["max_steps"] == 2 and a.hparams["seed"] == 3 and a.hparams["patience"] == 2


def test_pcgu_hparams_equal_keywords(tiny):
    from biaslens.unlearn import ContrastPair, pcgu

    pairs = [ContrastPair("The nurse said that she was tired.", "The nurse said that he was tired."),
             ContrastPair("The engineer said that he was late.", "The engineer said that she was late.")]
    kw = {"k": 20, "lr": 0.1, "max_steps": 1, "params": "mlp", "form": "sentence", "keep_weight": 0.0}
    a = pcgu(tiny, pairs, validation=None, progress=False, **kw)
    a.undo(tiny)
    b = pcgu(tiny, pairs, validation=None, progress=False, hparams=PCGUHparams(**kw))
    b.undo(tiny)
    _same_delta(a, b)
    assert a.hparams["k"] == 20 and a.hparams["params"] == "mlp" and a.hparams["n_sites"] == 5


def test_task_vector_hparams_equal_keywords(tiny):
    from biaslens.defaults import defaults_for
    from biaslens.unlearn.select import Bounds, Validation
    from biaslens.unlearn.task_vector import task_vector_negation

    d = defaults_for(tiny)
    val = Validation(tiny, prompts=d.occupation_prompts("edit", "validation")[::9],
                     definitional=d.definitional_prompts("validation")[::15], ppl_texts=PPL,
                     bounds=Bounds(ppl_rise=1e9, definitional_drop=1.0, margin_drop=1.0))
    kw = {"lora_rank": 2, "steps": 2, "lr": 1e-2, "lambdas": [1.0, 50.0], "refine": 0, "keep_weight": 0.0}
    a = task_vector_negation(tiny, TEXTS * 2, validation=val, progress=False, **kw)
    a.undo(tiny)
    b = task_vector_negation(tiny, TEXTS * 2, validation=val, progress=False, hparams=kw)
    b.undo(tiny)
    assert a.info["lambda"] == b.info["lambda"] and a.hparams == b.hparams
    assert a.names == b.names and all(torch.equal(a.diff(n), b.diff(n)) for n in a.names)
    assert a.hparams["lora_rank"] == 2 and a.hparams["lambdas"] == [1.0, 50.0]


def test_offset_hparams_equal_keywords(tiny):
    from biaslens.unlearn.data import with_word_spans
    from biaslens.unlearn.offset import offset_unlearn

    kw = {"loss": "grad_diff", "lr": 1e-3, "max_steps": 2, "eval_every": 1, "keep_weight": 0.0, "alphas": None}
    a = offset_unlearn(tiny, tiny, with_word_spans(TEXTS), PPL, validation=None, progress=False, **kw)
    b = offset_unlearn(tiny, tiny, with_word_spans(TEXTS), PPL, validation=None, progress=False,
                       hparams=OffsetHparams(**kw))
    _same_delta(a.delta, b.delta)
    assert a.delta.hparams["loss"] == "grad_diff" and a.delta.hparams["alphas"] is None
    batch = tiny.encode([Prompt("The nurse said that", "nurse")])
    with torch.no_grad():
        assert torch.equal(a.forward(batch), b.forward(batch))
