"""Unlearning building blocks on tiny random models: span masks and their gradient, the offset
formula, LoRA rank, exact undo, data files, the validation selection (bounds, never a test
template), the definitional keep term and the λ sweep."""

from __future__ import annotations

import json

import pytest
import torch

import biaslens
from biaslens.errors import BiasLensError, DataFormatError
from biaslens.prompts import Prompt
from biaslens.unlearn.common import encode_spans, span_nll, token_nll, unique_params
from biaslens.unlearn.data import SpanText, diff_span, find_spans, read_span_jsonl, with_word_spans

TEXTS = ["The nurse said that she was tired.", "The engineer said that he would be back soon.",
         "The clerk forgot her keys at home.", "The plumber lost his wallet on the bus."]
VAL = [Prompt("The nurse said that", "nurse"), Prompt("The engineer said that", "engineer")]
PPL = ["The red box is on the table.", "It was sunny in the city on Monday."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return biaslens.load(tiny_dirs["gpt2"])


def test_find_spans_whole_words_only():
    text = "She said the shepherd saw her and Hershey."
    spans = find_spans(text)
    assert [text[s:e] for s, e in spans] == ["She", "her"]


def test_diff_span_covers_the_differing_word():
    a, b = "The nurse said that she was tired.", "The nurse said that he was tired."
    s, e = diff_span(a, b)
    assert a[s:e] == "she"


def test_span_tokens_are_the_only_targets(tiny):
    items = with_word_spans(TEXTS)
    b = encode_spans(tiny, items)
    for i, item in enumerate(items):
        tokens = [tiny.tokenizer.decode([t]) for t in b.input_ids[i][b.target[i]].tolist()]
        words = [item.text[s:e] for s, e in item.spans]
        assert "".join(tokens).strip() == " ".join(words)


def test_masked_loss_gradient_reaches_only_span_positions(tiny):
    """The gradient of the masked-span loss w.r.t. the logits is zero at every position that does
    not predict a span token, and non-zero at every position that does (Lu et al. 2024)."""
    items = with_word_spans(TEXTS)
    b = encode_spans(tiny, items)
    logits = tiny.forward(b.input_ids, attention_mask=b.attention_mask).detach().requires_grad_(True)
    (-token_nll(logits, b)).backward()
    g = logits.grad.abs().sum(-1)  # [batch, pos]
    predicts_span = torch.zeros_like(b.target)
    predicts_span[:, :-1] = b.target[:, 1:]
    assert (g[~predicts_span] == 0).all()
    assert (g[predicts_span] > 0).all()
    assert int(predicts_span.sum()) == len(items)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("spans_only", [True, False])
def test_span_nll_unembeds_only_target_positions_with_the_same_loss_and_gradient(tiny_dirs, arch, spans_only):
    """The training losses unembed only the positions that predict a target token; the loss and
    every weight's gradient equal those of the full-vocabulary logits at every position."""
    from biaslens.unlearn.common import plain_logits

    model = biaslens.load(tiny_dirs[arch])
    b = encode_spans(model, with_word_spans(TEXTS), spans_only=spans_only)
    params = [p for p in model.plain_module().parameters()]
    for p in params:
        p.requires_grad_(True)
    full = token_nll(plain_logits(model, b.input_ids, b.attention_mask), b)
    g_full = torch.autograd.grad(full, params, allow_unused=True)
    part = span_nll(model, b)
    g_part = torch.autograd.grad(part, params, allow_unused=True)
    assert torch.allclose(full, part, rtol=1e-6, atol=1e-6)
    for a, c in zip(g_full, g_part):
        assert (a is None) == (c is None)
        if a is not None:
            assert torch.allclose(a, c, rtol=1e-5, atol=1e-7)
    assert any(a is not None and a.abs().sum() > 0 for a in g_full)


def test_read_span_jsonl_formats_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"text": "The nurse said that she left.", "spans": [[20, 23]]}),
        json.dumps({"text": "The chef said that he left.", "span": "he"}),
        json.dumps({"text": "The clerk forgot her keys."}),
        json.dumps({"advantaged": "The nurse said she left.", "disadvantaged": "The nurse said he left."}),
    ]) + "\n")
    items = read_span_jsonl(f)
    assert [[it.text[s:e] for s, e in it.spans] for it in items] == [["she"], ["he"], ["her"], ["she"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "short", "spans": [[2, 99]]}) + "\n")
    with pytest.raises(DataFormatError, match="bad.jsonl, line 1"):
        read_span_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DataFormatError, match="bad.jsonl, line 1"):
        read_span_jsonl(bad)


def test_training_reaches_the_fused_qkv_weight(tiny):
    """GPT-2's c_attn runs in the bridge through q/k/v views; training goes through a plain HF
    module on the same Parameters, so c_attn is trained and the bridge sees the change."""
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    b = tiny.encode(VAL)
    with torch.no_grad():
        before = tiny.forward(b)
    d = masked_span_ascent(tiny, with_word_spans(TEXTS), lr=1e-2, max_steps=1, eval_every=1, validation=None,
                           keep_weight=0, progress=False)
    assert "transformer.h.0.attn.c_attn.weight" in d.names
    with torch.no_grad():
        ref = tiny.plain_module()(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        assert torch.allclose(tiny.forward(b), ref, atol=1e-4)  # bridge and plain module agree
        assert not torch.allclose(tiny.forward(b), before, atol=1e-4)
    d.undo(tiny)


def _loose(model, **kw):
    """A validation on a slice of the model's validation split whose bounds nothing breaks."""
    from biaslens.defaults import defaults_for
    from biaslens.unlearn.select import Bounds, Validation

    d = defaults_for(model)
    return Validation(model, prompts=d.occupation_prompts("edit", "validation")[::5],
                      definitional=d.definitional_prompts("validation")[::9], ppl_texts=PPL,
                      bounds=Bounds(ppl_rise=1e9, definitional_drop=1.0, margin_drop=1.0), **kw)


def test_lora_task_vector_is_low_rank_and_undo_is_exact(tiny):
    """LoRA task vector with the keep term at the negated weights: ΔW stays rank ≤ r, the chosen λ
    is the lowest validation contrast of the sweep (0 when none is below the base), undo exact."""
    from biaslens.unlearn.task_vector import task_vector_negation

    before = tiny.weight_hash()
    d = task_vector_negation(tiny, TEXTS * 4, lora_rank=2, steps=4, lr=1e-2, lambdas=(1.0, 50.0),
                             validation=_loose(tiny), keep_prompts=None, keep_weight=30.0, progress=False)
    sweep = d.info["sweep"]
    assert sweep[0]["lambda"] == 0.0 and {1.0, 50.0} <= {r["lambda"] for r in sweep}
    best = min(sweep[1:], key=lambda r: r["contrast"])
    assert d.info["lambda"] == (best["lambda"] if best["contrast"] < sweep[0]["contrast"] else 0.0)
    assert d.info["selection"]["chosen"]["contrast"] == min(r["contrast"] for r in sweep)
    assert d.hparams["keep_weight"] == 30.0 and d.hparams["n_keep_prompts"] > 0
    if d.info["lambda"]:
        assert d.names
    for n in d.names:
        assert torch.linalg.matrix_rank(d.diff(n).double(), rtol=1e-6) <= 2
    d.undo(tiny)
    assert tiny.weight_hash() == before


def test_offset_logits_equal_the_formula(tiny, tiny_dirs):
    from biaslens.unlearn.offset import OffsetModel

    base = biaslens.load(tiny_dirs["gpt2"])
    off = biaslens.load(tiny_dirs["gpt2"])
    with torch.no_grad():
        off.mlp_out_weight(1).add_(0.3 * torch.randn_like(off.mlp_out_weight(1)))
    om = OffsetModel(tiny, base, off, alpha=0.7)
    b = tiny.encode(VAL)
    with torch.no_grad():
        want = tiny.forward(b) + 0.7 * (off.forward(b) - base.forward(b))
        got = om.forward(b)
        assert torch.allclose(got, want, atol=1e-5)
        last = om.last_logits(b)
        lp = om.target_logprobs(b, [" he", " she"])
    assert torch.allclose(last, want[torch.arange(2), b.lengths - 1], atol=1e-5)
    ref = torch.log_softmax(want[torch.arange(2), b.lengths - 1], -1)[:, [tiny.single_token(" he"), tiny.single_token(" she")]]
    assert torch.allclose(lp, ref, atol=1e-5)
    assert not torch.allclose(got, tiny.forward(b).detach(), atol=1e-3)


def test_offset_refuses_another_tokenizer(tiny, tiny_dirs):
    from biaslens.unlearn.offset import OffsetModel

    from biaslens import organism

    if not (organism.CHECKPOINT_DIR / "config.json").exists():
        pytest.skip("needs the organism checkpoint (a model with another tokenizer)")
    other = biaslens.load("organism")
    with pytest.raises(BiasLensError, match="tokenizer"):
        OffsetModel(tiny, other, other)


def test_offset_export_round_trip(tiny, tmp_path):
    from biaslens.unlearn.offset import export_offset, load_offset, offset_unlearn

    om = offset_unlearn(tiny, tiny, with_word_spans(TEXTS), PPL, loss="grad_diff", lr=1e-3, max_steps=2,
                        eval_every=1, validation=None, keep_weight=0, progress=False)
    assert om.delta.names  # the offset model moved
    out = export_offset(om, tmp_path / "pair")
    meta = json.loads((out / "offset.json").read_text())
    assert meta["alpha"] == 1.0 and meta["hyperparameters"]["loss"] == "grad_diff"
    again = load_offset(out, tiny)
    b = tiny.encode(VAL)
    with torch.no_grad():
        assert torch.allclose(again.forward(b), om.forward(b), atol=1e-5)
    om.delta.undo(om.offset)  # undo switches the correction off exactly
    with torch.no_grad():
        assert torch.allclose(om.forward(b), tiny.forward(b), atol=1e-5)


def test_validation_defaults_to_the_validation_split_and_refuses_test_templates(tiny):
    """The strength is scored on occupation_prompts("edit", "validation") and the definitional
    words on the validation templates plus a word-balanced sample of the edit templates; any
    prompt set sharing a template with the test split is refused."""
    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import template_of
    from biaslens.prompts import female_rate
    from biaslens.unlearn.select import Validation, split_templates

    d = defaults_for(tiny)
    v = Validation(tiny)
    assert [p.text for p in v.prompts] == [p.text for p in d.occupation_prompts("edit", "validation")]
    val_def = d.definitional_prompts("validation")
    assert [p.text for p in v.definitional[: len(val_def)]] == [p.text for p in val_def]
    extra = v.definitional[len(val_def):]
    edit_tpl = {template_of(p) for p in d.definitional_prompts("edit")}
    assert len(extra) == min(512, len(d.definitional_prompts("edit"))) and {template_of(p) for p in extra} <= edit_tpl
    words = {}
    for p in extra:
        words[p.occupation] = words.get(p.occupation, 0) + 1
    assert max(words.values()) - min(words.values()) <= 1  # every word equally often
    assert {female_rate(p) >= 0.5 for p in extra} == {True, False}
    test = split_templates(tiny, "test")
    assert test and not ({template_of(p) for p in v.prompts + v.definitional} & test)
    leak = d.occupation_prompts("edit", "validation")[:20] + d.occupation_prompts("edit", "test")[:1]
    with pytest.raises(BiasLensError, match="never on the test templates"):
        Validation(tiny, prompts=leak)
    with pytest.raises(BiasLensError, match="test templates"):
        Validation(tiny, definitional=d.definitional_prompts("test"))


def test_bounds_and_the_choice():
    """check(): perplexity, definitional argmax and definitional margin bounds against the base;
    best(): the lowest validation contrast within every bound, the base when none is lower."""
    import numpy as np

    from biaslens.unlearn.select import Bounds, Point, Validation

    v = Validation.__new__(Validation)
    v.bounds, v.ppl_texts = Bounds(), ["x"]
    v.separated = np.array([True, True, False])
    v.base = Point({"step": 0}, 0.30, 0.90, 0.95, 1.0, 3.0)
    assert v.check(0.1, 0.90, 0.95, 3.29) == (True, "")
    assert v.check(0.1, 0.90, 0.95, 3.31)[1].startswith("perplexity")
    assert v.check(0.1, 0.879, 0.95, 3.0)[1].startswith("definitional accuracy")
    ok, why = v.check(0.1, 0.90, 0.929, 3.0)  # argmax kept, margin collapsed: refused
    assert not ok and why.startswith("definitional margin")
    assert v.check(0.1, 0.88, 0.93, 3.0)[0]  # exactly at both 2-point bounds
    pts = [Point({"step": 10}, 0.20, 0.9, 0.95, 1.0, 3.0), Point({"step": 20}, 0.10, 0.9, 0.90, 1.0, 3.0, False, "m"),
           Point({"step": 30}, 0.25, 0.9, 0.95, 1.0, 3.0)]
    v.points = [v.base, *pts]
    assert v.best() is pts[0]
    v.points = [v.base, Point({"step": 5}, 0.31, 0.9, 0.95, 1.0, 3.0)]
    assert v.best() is v.base
    with pytest.raises(BiasLensError, match="non-negative"):
        Bounds(ppl_rise=-0.1)


def four_prompt_validation():
    """A Validation without a model: four separated definitional prompts (two female words,
    two male), base shares 0.97, 0.95 | 0.93, 0.95, perplexity 3, contrast 0.3."""
    import numpy as np

    from biaslens.unlearn.select import Bounds, Point, Validation

    v = Validation.__new__(Validation)
    v.bounds, v.ppl_texts = Bounds(), ["x"]
    v.separated = np.array([True, True, True, True])
    v.female = np.array([True, True, False, False])
    v.base = Point({"step": 0}, 0.3, 1.0, 0.95, 1.0, 3.0,
                   by_gender=v._by_gender(np.array([0.97, 0.95, 0.93, 0.95])))
    return v


def test_bounds_hold_for_each_gender():
    """A candidate that makes the model say "he" more often raises the male words' accuracy
    as much as it lowers the female words': the totals are unchanged, the per-gender check
    refuses it (and passes it when per_gender is off)."""
    import numpy as np

    from biaslens.unlearn.select import Bounds

    v = four_prompt_validation()
    assert v.base.by_gender == {"female": (1.0, pytest.approx(0.96)), "male": (1.0, pytest.approx(0.94))}
    shifted = np.array([0.92, 0.91, 0.98, 0.99])  # female words down 4 points, male up 4.5: mean 0.95
    acc, margin, _ = v._definitional(shifted)
    assert acc == 1.0 and margin == pytest.approx(0.95)
    ok, why = v.check(0.1, acc, margin, 3.0, v._by_gender(shifted))
    assert not ok and why.startswith("definitional margin of the female words")
    flipped = np.array([0.97, 0.45, 0.99, 0.99])  # one female word flips, the male words gain
    ok, why = v.check(0.1, 0.75, 0.85, 3.0, v._by_gender(flipped))
    assert not ok and why.startswith("definitional accuracy") and "female" not in why  # the total fails first
    v.bounds = Bounds(definitional_drop=0.3, margin_drop=0.2)
    ok, why = v.check(0.1, 0.75, 0.85, 3.0, v._by_gender(flipped))
    assert not ok and why.startswith("definitional accuracy of the female words 0.500")
    v.bounds = Bounds(per_gender=False)
    assert v.check(0.1, acc, margin, 3.0, v._by_gender(shifted)) == (True, "")
    assert v.check(0.1, 1.0, 0.95, 3.0) == (True, "")  # no per-gender numbers: the totals only


def test_guard_stops_only_while_moving_further_out():
    """The early-stopping guard gives up after ``patience`` out-of-bounds checks in a row that
    move further out, but a check that is out by less than the one before is on its way back:
    a run that dips past the male words' accuracy bound for two checks and returns goes on (the
    δ-offset dip on organism-llama), one that keeps falling stops at its second check."""
    from biaslens.unlearn.common import Guard
    from biaslens.unlearn.select import Point

    v = four_prompt_validation()
    male_margin = {"out 0.04": 0.88, "out 0.01": 0.91, "in": 0.935}  # male base margin 0.94, drop 0.02

    class Scripted:  # Validation.measure on a script of per-gender numbers instead of a model
        def __init__(self, script):
            self.script, self.base = list(script), v.base

        def measure(self, model, step, **setting):
            m = male_margin[self.script.pop(0)]
            by_gender = {"female": v.base.by_gender["female"], "male": (1.0, m)}
            ok, why = v.check(0.1, 1.0, 0.95, 3.0, by_gender)
            return Point({"step": step}, 0.1, 1.0, 0.95, 1.0, 3.0, ok, why, {}, by_gender,
                         0.0 if ok else v.shortfall(0.1, 1.0, 0.95, 3.0, by_gender))

    class Owner:
        def snapshot(self, names):
            return {}

    back = Guard(Owner(), [], Scripted(["out 0.04", "out 0.01", "in"]), patience=2)
    back.best.point = v.base
    assert [back.check(s) for s in (10, 20, 30)] == [True, True, True]
    assert back.best.point.setting == {"step": 30} and back.history[0].shortfall == pytest.approx(0.04)
    away = Guard(Owner(), [], Scripted(["out 0.01", "out 0.04"]), patience=2)
    away.best.point = v.base
    assert [away.check(s) for s in (10, 20)] == [True, False]
    assert away.stopped.startswith("step 20: definitional margin of the male words")
    same = Guard(Owner(), [], Scripted(["out 0.04", "out 0.04"]), patience=2)
    same.best.point = v.base
    assert [same.check(s) for s in (10, 20)] == [True, False]  # not closer: counted
    assert v.shortfall(float("nan"), 1.0, 0.95, 3.0) == float("inf")
    assert v.shortfall(0.1, 1.0, 0.95, 3.3) == pytest.approx(0.0)  # perplexity at 1.10 x: within
    assert v.shortfall(0.1, 1.0, 0.95, 3.6) == pytest.approx(0.1)


def test_keep_term_is_zero_at_the_start_and_pulls_back(tiny):
    """The keep term is 0 (with zero gradient) on the unchanged model, positive once the
    definitional pronoun probabilities move, and its gradient step brings them back."""
    from biaslens.unlearn.common import KeepTerm, model_forward

    keep = KeepTerm(tiny, None, weight=30.0, batch_size=16)
    assert keep.prompts and all(p.female_rate in (0.0, 1.0) for p in keep.prompts)
    fwd = model_forward(tiny)
    name = "transformer.wte.weight"
    p = tiny.param(name)
    p.requires_grad_(True)
    loss = keep.loss(fwd)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and float(p.grad.abs().max()) < 1e-5
    p.grad = None
    snap = tiny.snapshot([name])
    she = tiny.single_token(" she", "The queen said that")
    with torch.no_grad():
        p[she] *= 40.0  # the tied " she" unembedding row: its logit after every prompt moves
    keep.stream = iter([list(range(16))] * 3)
    moved = keep.loss(fwd)
    moved.backward()
    assert float(moved.detach()) > 1e-3
    with torch.no_grad():
        p -= 1e-2 * p[she].norm() * p.grad / p.grad.norm()
    assert float(keep.loss(fwd).detach()) < float(moved.detach())
    tiny.restore(snap)
    p.grad = None
    p.requires_grad_(False)


def test_lambda_sweep_extends_down_and_refines(tiny):
    """When every λ of the grid breaks a bound (a strong task vector), the sweep halves below the
    smallest until one is within the bounds, then bisects next to it: λ = 0 (no change) is only
    kept when nothing lowers the contrast."""
    from biaslens.unlearn.select import Bounds, Validation
    from biaslens.unlearn.task_vector import sweep_lambdas

    name = tiny.mlp_out_name(0)
    original = tiny.snapshot([name])
    tau = {name: torch.ones_like(original[name])}

    class Synthetic(Validation):  # contrast falls with λ, perplexity rises 10 per unit of λ
        def _numbers(self, model):
            lam = float((original[name] - model.param(name).detach()).mean())
            return 0.5 - 0.1 * lam, {}, None, 1.0 + 10 * lam

    v = Synthetic(tiny, prompts=tiny_val(tiny), definitional=[], ppl_texts=PPL, bounds=Bounds(ppl_rise=0.1))
    v.start(tiny)
    pts = sweep_lambdas(tiny, original, tau, v, (0.25, 0.5), refine=2, progress=False)
    lams = [p.setting["lambda"] for p in pts]
    assert lams[:2] == [0.25, 0.5] and 0.25 / 32 in lams  # halved five times: 0.0078125 is within the bound
    best = v.best(pts)
    assert best is not v.base and best.ok
    assert best.setting["lambda"] == pytest.approx(0.009765625)  # bisected towards the bound (ppl 1.098)
    assert torch.equal(tiny.param(name), original[name])  # the sweep leaves the model at θ_pre


def tiny_val(model):
    from biaslens.defaults import defaults_for

    return defaults_for(model).occupation_prompts("edit", "validation")[:40]


def test_offset_generation_uses_the_combined_logits(tiny, tiny_dirs):
    """With a zero offset (M'_o = M_o) generation equals the large model's own greedy decoding;
    with a non-zero one it follows the combined logits."""
    from biaslens.unlearn.offset import OffsetModel

    base = biaslens.load(tiny_dirs["gpt2"])
    off = biaslens.load(tiny_dirs["gpt2"])
    om = OffsetModel(tiny, base, off, alpha=2.0)

    def greedy(forward, n=4):
        ids = tiny.encode("The nurse said").input_ids
        for _ in range(n):
            with torch.no_grad():
                ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tiny.tokenizer.decode(ids[0, -n:].tolist())

    assert om.generate("The nurse said", max_new_tokens=4) == greedy(tiny.forward)
    with torch.no_grad():
        off.params["transformer.wte.weight"].mul_(-1.0)  # tied with lm_head: a different offset model
    assert om.generate("The nurse said", max_new_tokens=4) == greedy(om.forward)
    assert greedy(om.forward) != greedy(tiny.forward)


def test_sample_prompts_keeps_a_contrast_on_every_template(tiny):
    """--max-prompts samples validation prompts as templates x occupations of both directions,
    so the contrast is defined on every template it keeps (a random sample of 12 often is not)."""
    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import template_of
    from biaslens.unlearn.select import sample_prompts

    d = defaults_for(tiny)
    for prompts in (d.occupation_prompts("edit", "validation"), d.definitional_prompts("validation")):
        few = sample_prompts(prompts, 12, seed=3)
        assert 0 < len(few) <= 12
        for t in {template_of(p) for p in few}:
            rates = [p.female_rate for p in few if template_of(p) == t]
            assert max(rates) > 0.5 > min(rates)
        assert sample_prompts(prompts, 10 ** 6) == list(prompts)


@pytest.mark.parametrize("method", ["masked-span ascent", "offset"])
def test_keep_weight_grid_keeps_the_best_run_and_equals_it_run_alone(tiny, method):
    """A keep-weight grid trains once per weight from the same start; the choice is the lowest
    validation contrast within the bounds over every check of every run, and the weights it
    leaves are those of the run made with the chosen weight alone (same seed, same step)."""
    from biaslens.unlearn.masked_ascent import masked_span_ascent
    from biaslens.unlearn.offset import offset_unlearn

    def run(**kw):
        if method == "offset":
            kw = {"lrs": [3e-3, 1e-3], **kw} if "keep_weights" in kw else kw
            om = offset_unlearn(tiny, tiny, with_word_spans(TEXTS), PPL, loss="grad_diff", max_steps=4,
                                eval_every=2, alphas=None, validation=_loose(tiny), progress=False, **kw)
            return om.delta, {n: om.delta.diff(n).clone() for n in om.delta.names}
        d = masked_span_ascent(tiny, with_word_spans(TEXTS), lrs=[3e-3], max_steps=4, eval_every=2,
                               validation=_loose(tiny), progress=False, **kw)
        diffs = {n: d.diff(n).clone() for n in d.names}
        d.undo(tiny)
        return d, diffs

    before = tiny.weight_hash()
    grid, diffs = run(keep_weights=[0.0, 50.0])
    assert tiny.weight_hash() == before
    assert grid.hparams["keep_weights"] == [0.0, 50.0]
    if method == "offset":  # every pair of learning rate and keep weight is a run
        assert [(r["keep_weight"], r["lr"]) for r in grid.info["runs"]] == [
            (0.0, 3e-3), (0.0, 1e-3), (50.0, 3e-3), (50.0, 1e-3)]
    else:
        assert [r["keep_weight"] for r in grid.info["runs"]] == [0.0, 50.0]
    points = [p for p in grid.info["selection"]["sweep"] if p["ok"]]
    assert {p["keep_weight"] for p in points} == {0.0, 50.0}  # both runs were checked
    chosen = grid.info["selection"]["chosen"]
    assert chosen["contrast"] == min([grid.info["selection"]["base"]["contrast"]] + [p["contrast"] for p in points])
    w = grid.hparams["keep_weight"]
    assert chosen["step"] > 0 and diffs  # a checkpoint beat the unchanged model: the grid chose
    assert w == chosen["keep_weight"]
    alone, alone_diffs = run(keep_weight=w, **({"lr": grid.hparams["lr"]} if method == "offset" else {}))
    assert alone.info["selection"]["chosen"]["step"] == chosen["step"]
    assert set(alone_diffs) == set(diffs)
    for n in diffs:
        assert torch.allclose(alone_diffs[n], diffs[n], atol=1e-6), n


def test_keep_weight_grid_without_validation_runs_the_first_weight(tiny):
    from biaslens.unlearn.hparams import DEFAULT_KEEP_WEIGHTS
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    d = masked_span_ascent(tiny, with_word_spans(TEXTS), lr=1e-3, max_steps=1, validation=None, progress=False)
    assert d.hparams["keep_weight"] == DEFAULT_KEEP_WEIGHTS[0] and len(d.info["runs"]) == 1
    d.undo(tiny)
    with pytest.raises(BiasLensError, match="keep-weight grid needs validation"):
        masked_span_ascent(tiny, with_word_spans(TEXTS), lr=1e-3, max_steps=1, keep_weights=[0.0, 5.0],
                           validation=None, progress=False)
