"""The batched exact-patching engine against references, on GPT-2 (real BPE) and LLaMA (GQA).

- Same numbers as TransformerLens ``patching.get_act_patch_resid_pre / mlp_out / attn_out`` run
  on the same TransformerBridge (they run there: the bridge exposes ``hook_resid_pre`` etc. as
  aliases and ``cfg.n_layers``), per prompt, ≤ 1e-5.
- Noise tracing equals a one-forward-per-site reference built with the bridge's own hooks.
- Every family (GPT-2, NeoX, OPT, LLaMA) on the engine's own path equals TransformerLens; the
  fused GPT-2 blocks equal the bridge's blocks; attribution through them equals the bridge's
  gradients. The GPT-2-small benchmark's sites are checked in tests/integration/test_locate_parity.py (slow).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")

CLEAN = [("The nurse said that", "nurse"), ("The software engineer was promoted because", "software engineer"),
         ("My dancer", "dancer")]
CORRUPT = [("The man said that", "man"), ("The hardware engineer was promoted because", "hardware engineer"),
           ("My father", "father")]
MULTI = [("The paralegal said that", "paralegal"), ("The hairdresser yelled that", "hairdresser"),
         ("The nurse said that", "nurse"), ("Our pharmacist thinks", "pharmacist")]


@pytest.fixture(scope="module", params=["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def model(request, tiny_dirs):
    import biaslens

    return biaslens.load(tiny_dirs[request.param])


def _engine(model, early_start=True, metric=None, **kw):
    from biaslens.hooks import act_name
    from biaslens.locate.patching import Base, PatchEngine, clean_source
    from biaslens.metrics import pronoun_log_ratio

    cb, xb = model.encode(CLEAN), model.encode(CORRUPT)
    assert torch.equal(cb.lengths, xb.lengths)  # same-length corruption, as TL's API needs
    metric = metric or pronoun_log_ratio(model, CLEAN)
    rows = torch.arange(len(cb))
    hooks = [act_name(c, l) for c in ("resid_pre", "mlp_out", "attn_out") for l in range(model.n_layers)]
    src, _ = clean_source(model, cb, hooks, rows)
    base = Base(xb.input_ids, xb.attention_mask, xb.lengths, rows)
    # by default merge_tokens=0 and a small token budget: many chunks, each skipping its
    # unchanged prefix
    kw = {"max_tokens": 40, "merge_tokens": 0, **kw}
    return PatchEngine(model, base, {"clean": src}, metric, early_start=early_start, progress=False,
                       **kw), cb, xb, metric


def _tl_sweeps(model, cb, xb, metric):
    """TransformerLens ``patching`` of the three components: ``{component: [layer, pos, prompt]}``."""
    from transformer_lens import patching as tlp

    _, cache = model.bridge.run_with_cache(cb.input_ids)
    last = xb.lengths - 1

    def tl_metric(logits):  # per prompt, at each prompt's last real token
        return metric(logits[torch.arange(len(last)), last])

    fns = {"resid": tlp.get_act_patch_resid_pre, "mlp": tlp.get_act_patch_mlp_out, "attn": tlp.get_act_patch_attn_out}
    return {c: f(model.bridge, xb.input_ids, cache, tl_metric, reduce="none").values for c, f in fns.items()}


def _assert_equals_tl(engine, ref):
    from biaslens.locate.patching import (patch_attn_out_by_pos, patch_mlp_out_by_pos,
                                          patch_resid_pre_by_pos)

    fns = {"resid": patch_resid_pre_by_pos, "mlp": patch_mlp_out_by_pos, "attn": patch_attn_out_by_pos}
    for c, fn in fns.items():
        ours = fn(engine)  # [layer, pos, prompt]
        assert ours.shape == ref[c].shape
        torch.testing.assert_close(ours, ref[c].to(ours.dtype), atol=1e-5, rtol=0)
        # the patches matter (not a comparison of two unpatched runs)
        assert (ours - engine.base_metric[None, None]).abs().max() > 1e-3


def test_exact_patching_equals_transformer_lens(model):
    engine, cb, xb, metric = _engine(model)
    # re-entry and the cached prefix under test: through the fused blocks on GPT-2 (their calls
    # split the final block), else through the bridge's with the split and mixed lengths
    assert engine.early_start and engine.skip_prefix
    assert engine.fused == (type(model.bridge.blocks[0].original_component).__name__ == "GPT2Block")
    assert engine.fused or (engine.split_final and engine.mix_lengths)
    _assert_equals_tl(engine, _tl_sweeps(model, cb, xb, metric))


@pytest.mark.parametrize("arch", ["neox", "opt"])
def test_every_family_equals_transformer_lens(arch, tiny_dirs):
    """The engine on the bridge's own blocks (these families have no fused path), chunks merged
    by the planner (default budget) and one-row chunks (max_tokens=1)."""
    import biaslens

    model = biaslens.load(tiny_dirs[arch])
    small, cb, xb, metric = _engine(model)
    assert not small.fused and small.early_start and small.skip_prefix
    ref = _tl_sweeps(model, cb, xb, metric)
    _assert_equals_tl(small, ref)
    merged, *_ = _engine(model, max_tokens=8192, merge_tokens=None)
    _assert_equals_tl(merged, ref)
    assert merged.stats["block_calls"] < small.stats["block_calls"]


def test_fused_gpt2_blocks_equal_the_bridge_blocks(tiny_dirs):
    """GPT-2 through the fused blocks (one call per block for a sweep) and through the bridge's
    blocks: the same numbers, and TransformerLens's."""
    import biaslens
    from biaslens.locate.patching import patch_by_pos

    model = biaslens.load(tiny_dirs["gpt2"])
    fused, cb, xb, metric = _engine(model, max_tokens=8192, merge_tokens=None)
    bridge, *_ = _engine(model, max_tokens=8192, merge_tokens=None, fused=False)
    assert fused.fused and not bridge.fused and bridge.split_final and bridge.mix_lengths
    a, b = patch_by_pos(fused), patch_by_pos(bridge)
    for c in a:
        torch.testing.assert_close(a[c], b[c], atol=1e-5, rtol=0)
    assert fused.stats["block_calls"] == model.n_layers  # every group of the sweep in one call per block
    _assert_equals_tl(bridge, _tl_sweeps(model, cb, xb, metric))


def test_patch_by_pos_and_source_runs_give_the_sweeps_numbers(model):
    """One run of the three sweeps equals the three sweeps; a clean run computed in the base
    forward (SourceRun) equals one computed before (clean_source), logits too."""
    from biaslens.hooks import act_name
    from biaslens.locate.patching import (Base, PatchEngine, SourceRun, clean_source, patch_attn_out_by_pos,
                                          patch_by_pos, patch_mlp_out_by_pos, patch_resid_pre_by_pos)

    engine, cb, xb, metric = _engine(model)
    rows = torch.arange(len(cb))
    hooks = [act_name(c, l) for c in ("resid_pre", "mlp_out", "attn_out") for l in range(model.n_layers)]
    base = Base(xb.input_ids, xb.attention_mask, xb.lengths, rows)
    riding = PatchEngine(model, base, {"clean": SourceRun(cb, hooks, rows)}, metric, progress=False)
    _, clean_last = clean_source(model, cb, hooks, rows)
    torch.testing.assert_close(riding.source_logits["clean"], clean_last, atol=1e-5, rtol=0)
    torch.testing.assert_close(riding.base_logits, engine.base_logits, atol=1e-5, rtol=0)
    together = patch_by_pos(riding)
    for c, fn in (("resid", patch_resid_pre_by_pos), ("mlp", patch_mlp_out_by_pos), ("attn", patch_attn_out_by_pos)):
        torch.testing.assert_close(together[c], fn(engine), atol=1e-5, rtol=0)


def test_attribution_scores_equal_the_bridge_gradients(model):
    """attribution_scores (on GPT-2: the fused blocks, the shared prefix run once) gives
    gradient_attribution's scores after clean_source; the shared prefix scores exactly 0."""
    from biaslens.hooks import act_name
    from biaslens.locate.attribution import shared_prefix, attribution_scores, gradient_attribution
    from biaslens.locate.patching import Base, clean_source
    from biaslens.metrics import pronoun_log_ratio

    cb, xb = model.encode(CLEAN), model.encode(CORRUPT)
    metric = pronoun_log_ratio(model, CLEAN)
    rows = torch.arange(len(cb))
    hooks = [act_name(c, l) for c in ("resid_pre", "mlp_out", "attn_out") for l in range(model.n_layers)]
    base = Base(xb.input_ids, xb.attention_mask, xb.lengths, rows)
    src, clean_last = clean_source(model, cb, hooks, rows)
    ref, ref_m = gradient_attribution(model, base, src, metric, hooks)
    got, m, last = attribution_scores(model, cb, base, metric, hooks)
    torch.testing.assert_close(m, ref_m, atol=1e-5, rtol=0)
    cols = metric.columns
    torch.testing.assert_close(last[:, cols], clean_last[:, cols], atol=1e-4, rtol=0)
    skip = shared_prefix(cb, base, rows)
    assert skip >= 1  # BOS (and "The"/"My") shared
    for h in hooks:
        torch.testing.assert_close(got[h], ref[h], atol=1e-6, rtol=1e-4)
        assert not got[h][:, :skip].any()
    assert max(float(ref[h].abs().max()) for h in hooks) > 1e-4  # not all zero


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_forward_fallback_gives_the_same_numbers(arch, tiny_dirs):
    import biaslens
    from biaslens.locate.patching import patch_mlp_out_by_pos

    model = biaslens.load(tiny_dirs[arch])
    fast, *_ = _engine(model, early_start=True)
    slow, *_ = _engine(model, early_start=False)
    assert not slow.early_start and fast.skip_prefix
    torch.testing.assert_close(patch_mlp_out_by_pos(fast), patch_mlp_out_by_pos(slow), atol=1e-5, rtol=0)


def test_base_run_in_row_chunks_merges_their_kv_caches(model):
    """A base run split into one-row chunks (one KV cache each, merged) re-enters on cached
    prefixes and gives the numbers of the engine whose base run is one chunk."""
    from biaslens.locate.patching import Base, PatchEngine, patch_mlp_out_by_pos

    one, cb, xb, metric = _engine(model)
    width = int(xb.input_ids.shape[1])
    base = Base(xb.input_ids, xb.attention_mask, xb.lengths, torch.arange(len(xb)))
    split = PatchEngine(model, base, one.sources, metric, progress=False, max_tokens=width,
                        merge_tokens=0)
    assert split.early_start and split.skip_prefix
    torch.testing.assert_close(split.base_logits, one.base_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(patch_mlp_out_by_pos(split), patch_mlp_out_by_pos(one), atol=1e-5, rtol=0)


def test_noop_skipping_and_metric_columns_change_no_number(model):
    """The two shortcuts against the engine without them: skipping patches whose source equals
    the base (the prompts share "The"/"My" and BOS) and unembedding only the pronoun columns."""
    from biaslens.locate.patching import patch_attn_out_by_pos, patch_resid_pre_by_pos
    from biaslens.metrics import LogitMetric, pronoun_log_ratio

    full_metric = pronoun_log_ratio(model, CLEAN)
    # the same per-prompt function, without the declared columns
    plain = LogitMetric(full_metric.fn, full_metric.name)
    plain._subset = lambda idx: LogitMetric(full_metric.subset(idx).fn, full_metric.name)

    fast, cb, xb, _ = _engine(model)
    slow, *_ = _engine(model, metric=plain, skip_noops=False)
    assert fast._cols is not None and slow._cols is None
    for fn in (patch_resid_pre_by_pos, patch_attn_out_by_pos):
        a, b = fn(fast), fn(slow)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert fast.stats["noop_rows"] > 0 and slow.stats["noop_rows"] == 0
    assert fast.stats["block_tokens"] < slow.stats["block_tokens"]
    # the shared first token: patching it changes nothing, and the engine knew without running it
    same = (cb.input_ids[:, 0] == xb.input_ids[:, 0]).all()
    assert same
    torch.testing.assert_close(a[:, 0], fast.base_metric[None].expand(a.shape[0], -1), atol=0, rtol=0)
    # a position where the prompts differ is not a no-op
    assert (a - fast.base_metric).abs().max() > 1e-3


def _reference_noise_ie(model, prompts, hook: str, role: str, n_samples: int, seed: int):
    """One forward per (prompt, noise sample) with the bridge's hooks: noise on the subject's
    token embeddings, clean value restored at ``hook`` at the role's positions."""
    from biaslens.hooks import act_name
    from biaslens.locate.noise import noise_base
    from biaslens.metrics import pronoun_log_ratio

    batch = model.encode(prompts)
    base, _ = noise_base(model, batch, n_samples, 3.0, seed)
    metric = pronoun_log_ratio(model, prompts)
    out = torch.empty(len(prompts), n_samples)
    corrupted = torch.empty(len(prompts), n_samples)
    for p in range(len(prompts)):
        one = model.encode([prompts[p]])
        L = int(one.lengths[0])
        _, cache = model.run_with_cache(one, [hook])
        clean = cache[hook]
        pos = batch.positions(role)[p]
        for s in range(n_samples):
            delta = base.embed_delta[p * n_samples + s, :L][None]

            def add(act, hook, delta=delta):
                return act + delta

            def restore(act, hook):
                act = act.clone()
                act[:, pos] = clean[:, pos]
                return act

            for k, hooks in enumerate(([(act_name("embed"), add)], [(act_name("embed"), add), (hook, restore)])):
                with torch.no_grad():
                    logits = model.bridge.run_with_hooks(one.input_ids, fwd_hooks=hooks)
                val = metric.subset(torch.tensor([p]))(logits[:, L - 1])[0]
                (corrupted if k == 0 else out)[p, s] = val
    return out.mean(1), corrupted.mean(1)


def test_noise_trace_equals_one_forward_per_site_reference(model):
    """Padding, per-prompt role positions and multi-token subjects, against unbatched runs."""
    from biaslens.hooks import act_name
    from biaslens.locate.noise import trace_noise

    em = trace_noise(model, MULTI, n_samples=1, seed=3, normalize=False, progress=False, n_boot=10,
                     components=("mlp", "resid"))
    for comp, hook_comp, layer, role in (("mlp", "mlp_out", 1, "subject_last"), ("resid", "resid_pre", 2, "subject_middle")):
        restored, corrupted = _reference_noise_ie(model, MULTI, act_name(hook_comp, layer), role, 1, 3)
        sign = torch.tensor(em.meta["sign"])
        np.testing.assert_allclose(em.meta["corrupted_metric"], corrupted.numpy(), atol=1e-5)
        ie = (sign * (restored - corrupted)).numpy()
        got = em.per_prompt[comp][:, layer, em.roles.index(role)]
        present = np.array([bool(p) for p in model.encode(MULTI).positions(role)])
        np.testing.assert_allclose(got[present], ie[present], atol=1e-5)
        assert np.isnan(got[~present]).all()


def test_noise_trace_in_row_chunks_equals_one_run(model):
    """``max_rows`` bounds the corrupted rows traced at a time; the map (per prompt, with the
    severed path and the per-prompt pronoun targets of mixed forms) is the one-run map, to the
    float rounding the engine's own call sizes give (~1e-7 here; raw metric units: a random
    model's total effect is ~0.004, so normalised maps would magnify it 250 times)."""
    from biaslens.locate.noise import trace_noise
    from biaslens.prompts import Prompt

    prompts = [Prompt(t, o) for t, o in MULTI] + [Prompt("I met the nurse and thanked", "nurse", pronouns=("him", "her"))]
    kw = dict(n_samples=3, seed=1, sever=("mlp",), progress=False, n_boot=10, components=("mlp", "resid"),
              normalize=False)
    one = trace_noise(model, prompts, max_rows=None, **kw)
    assert one.meta["runs"] == 1
    for rows in (3, 7):  # one prompt a run; two a run, the last run shorter
        part = trace_noise(model, prompts, max_rows=rows, **kw)
        assert part.meta["runs"] == -(-len(prompts) // max(1, rows // 3))
        for key in one.per_prompt:
            np.testing.assert_allclose(part.per_prompt[key], one.per_prompt[key], atol=1e-6)
            assert np.array_equal(np.isnan(part.per_prompt[key]), np.isnan(one.per_prompt[key]))
        for k in ("te_per_prompt", "clean_metric", "corrupted_metric", "sign"):
            np.testing.assert_allclose(part.meta[k], one.meta[k], atol=1e-5, rtol=1e-5)


def test_noise_trace_refuses_a_bad_row_budget(model):
    from biaslens.errors import BiasLensError
    from biaslens.locate.noise import trace_noise

    with pytest.raises(BiasLensError, match="max_rows"):
        trace_noise(model, MULTI, n_samples=2, max_rows=0, progress=False)


def test_multi_token_occupations_with_real_bpe(tiny_dirs):
    """GPT-2 BPE splits these occupations; roles follow each prompt's own tokens."""
    import biaslens
    from biaslens.locate.noise import trace_noise
    from biaslens.locate.attribution import attribution_patch

    m = biaslens.load(tiny_dirs["gpt2"])
    b = m.encode(MULTI)
    n_sub = [len(range(f[0], l[0] + 1)) for f, l in zip(b.positions("subject_first"), b.positions("subject_last"))]
    assert n_sub == [3, 4, 1, 2]  # " par|ale|gal", " ha|ird|ress|er", " nurse", " pharm|acist"
    em = trace_noise(m, MULTI, n_samples=2, progress=False, n_boot=20)
    j = em.roles.index("subject_middle")
    mid = em.per_prompt["resid"][:, :, j]
    assert np.isfinite(mid[:2]).all() and np.isnan(mid[2:]).all()  # only 3+-token subjects have a middle
    assert np.isfinite(em.effects["mlp"][:, em.roles.index("subject_last")]).all()
    am = attribution_patch(m, MULTI, n_samples=2, n_boot=20)
    assert am.per_prompt["mlp"].shape == em.per_prompt["mlp"].shape


def test_llama_gqa_swap_heads_and_neurons(tiny_dirs):
    import biaslens
    from biaslens.locate.swap import trace_swap

    m = biaslens.load(tiny_dirs["llama"])
    assert m.n_kv_heads < m.n_heads  # grouped-query attention
    em = trace_swap(m, MULTI[:3], "man", top_n=4, progress=False, n_boot=20)
    assert np.asarray(em.heads["effects"]).shape == (m.n_layers, m.n_heads)
    assert len(em.neurons) == 4 and all(0 <= n["neuron"] < m.d_mlp for n in em.neurons)
    effects = [n["effect"] for n in em.neurons]
    assert effects == sorted(effects, reverse=True)
    # NIE + NDE maps for every component; NDE at an untouched role equals TE (nothing patched)
    assert {"resid", "resid_nde", "mlp", "mlp_nde", "attn", "attn_nde"} <= set(em.effects)
    te = np.array(em.meta["te_per_prompt"])
    np.testing.assert_allclose(em.per_prompt["mlp_nde"][:, 0, em.roles.index("prefix")], te, atol=1e-5)


def test_neuron_screening_matches_exact_ranking(tiny_dirs):
    """With attribution screening forced on, the top neuron is the exact run's top neuron."""
    import biaslens
    from biaslens.locate.swap import trace_swap

    m = biaslens.load(tiny_dirs["gpt2"])
    kw = dict(top_n=3, progress=False, n_boot=10, components=("mlp",), heads=False)
    exact = trace_swap(m, CLEAN, "woman", **kw)
    screened = trace_swap(m, CLEAN, "woman", max_exact_neurons=1, screen_pool=64, **kw)
    assert screened.neurons[0]["screened"] and not exact.neurons[0]["screened"]
    assert (screened.neurons[0]["layer"], screened.neurons[0]["neuron"]) == (
        exact.neurons[0]["layer"], exact.neurons[0]["neuron"])


@pytest.mark.parametrize("family,screen", [("gpt2", False), ("llama", True)])
def test_swap_trace_in_parts_equals_one_run(tiny_dirs, family, screen):
    """The swap trace run on at most 2 prompts at a time (3 parts of 5 prompts) gives one run's
    per-prompt maps, head effects, neurons (exact, or screened by attribution summed over the
    parts) and total effects."""
    import biaslens
    from biaslens.locate.swap import trace_swap

    m = biaslens.load(tiny_dirs[family])
    kw = dict(top_n=4, progress=False, n_boot=20)
    if screen:
        kw.update(max_exact_neurons=1, screen_pool=32)
    prompts = MULTI + CLEAN[1:2]
    one = trace_swap(m, prompts, "man", max_rows=None, **kw)
    parts = trace_swap(m, prompts, "man", max_rows=2, **kw)
    assert (one.meta["runs"], parts.meta["runs"]) == (1, 3)
    for k, v in one.per_prompt.items():
        np.testing.assert_allclose(parts.per_prompt[k], v, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=k)
    np.testing.assert_allclose(parts.heads["effects"], one.heads["effects"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parts.heads["nde_effects"], one.heads["nde_effects"], rtol=1e-4, atol=1e-5)
    # float32 forwards of 2 and of 5 padded rows differ by ~1e-6 (2.0e-6 seen on tiny LLaMA)
    np.testing.assert_allclose(parts.meta["te_per_prompt"], one.meta["te_per_prompt"], rtol=1e-4, atol=1e-5)
    assert [(n["layer"], n["neuron"]) for n in parts.neurons] == [(n["layer"], n["neuron"]) for n in one.neurons]
    assert all(n["screened"] == screen for n in parts.neurons)
    np.testing.assert_allclose([n["effect"] for n in parts.neurons], [n["effect"] for n in one.neurons],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([n["nde"] for n in parts.neurons], [n["nde"] for n in one.neurons],
                               rtol=1e-4, atol=1e-5)
    from biaslens.errors import BiasLensError

    with pytest.raises(BiasLensError, match="max_rows"):
        trace_swap(m, prompts, "man", max_rows=0, **kw)
