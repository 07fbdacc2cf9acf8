"""LSDM and its parts on tiny random models of every architecture: the least-squares solve, the
edit reaching its targets while keep prompts stay put, exact undo, refusal of NaN, the cached key
statistics, the baselines, site selection from an effect map, hyperparameter files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import biaslens
from biaslens import organism
from biaslens.edit import (CDAHparams, LSDMHparams, counterfactual_finetune, key_covariance,
                           least_squares_update, lsdm, rome_rank_one)
from biaslens.edit import covariance as cov_mod
from biaslens.edit import least_squares as lsdm_mod
from biaslens.edit.keys import gather, group_mean, site_batch
from biaslens.edit.targets import compute_targets, merged_pair_kl
from biaslens.errors import BiasLensError, DataFormatError
from biaslens.hooks import act_name
from biaslens.testing import organism_edit_sample, organism_keep_sample
from conftest import ARCHS

pytestmark = pytest.mark.usefixtures("one_thread")

OCCS = ["nurse", "plumber", "teacher", "mechanic"]
# few key columns (4 occupations) and keep prompts (8 words x 2 templates) < d_mlp: exact solve
HP = dict(cov_tokens=1500, cov_seq_len=64, v_steps=8, v_lr=0.5, mom2_weight=1e-6, keep_weight=1.0,
          ridge=0.0)


def edit_prompts(n_templates: int = 3):
    return organism_edit_sample(OCCS, "all", n_templates)


def keep_prompts():
    return organism_keep_sample()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "general.txt"
    path.write_text("\n".join(organism.generate_general_text(seed=3, n_lines=200)) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {a: biaslens.load(str(d)) for a, d in tiny_dirs.items()}


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cov"


# ------------------------------------------------------------------------------ the solve
def test_least_squares_update_is_the_regularised_minimiser():
    g = torch.Generator().manual_seed(0)
    n, m, d_mlp, d_model = 5, 4, 16, 6
    K = torch.randn(n, d_mlp, generator=g)
    R = torch.randn(n, d_model, generator=g)
    Kk = torch.randn(m, d_mlp, generator=g)
    X = torch.randn(50, d_mlp, generator=g)
    C = X.T @ X / 50
    dW = least_squares_update(K, R, C, 0.3, Kk, 2.0)
    assert dW.dtype == torch.float64 and dW.shape == (d_model, d_mlp)
    # gradient of ‖ΔW K - R‖² + 2‖ΔW Kk‖² + 0.3 tr(ΔW C ΔWᵀ) vanishes at the minimiser
    Kd, Rd, Kkd, Cd = (t.double() for t in (K, R, Kk, C))
    grad = (dW @ Kd.T - Rd.T) @ Kd + 2.0 * (dW @ Kkd.T) @ Kkd + 0.3 * dW @ Cd
    assert grad.abs().max() < 1e-10
    # almost no regularisation: the keys map onto their residuals, the keep keys onto zero
    dW0 = least_squares_update(K, R, C, 1e-9, Kk, 1.0)
    assert torch.allclose(dW0 @ Kd.T, Rd.T, atol=1e-5)
    assert (dW0 @ Kkd.T).abs().max() < 1e-5


def test_woodbury_solve_with_a_factor_equals_the_direct_solve():
    from biaslens.edit.solve import regularised_factor

    g = torch.Generator().manual_seed(1)
    n, m, d_mlp, d_model = 6, 5, 40, 8
    K, R, Kk = (torch.randn(n, d_mlp, generator=g), torch.randn(n, d_model, generator=g),
                torch.randn(m, d_mlp, generator=g))
    X = torch.randn(200, d_mlp, generator=g)
    C = X.T @ X / 200
    for lam, w in ((3.0, 10.0), (1e4, 100.0), (0.5, 0.0)):
        L = regularised_factor(C, lam, 1e-6)
        direct = least_squares_update(K, R, C, lam, Kk, w, 1e-6)
        fast = least_squares_update(K, R, C, lam, Kk, w, 1e-6, factor=L)
        torch.testing.assert_close(fast, direct, atol=1e-9 * direct.abs().max().item(), rtol=1e-7)


def test_singular_system_is_refused():
    K = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(BiasLensError, match="singular"):
        least_squares_update(K, torch.randn(2, 3), None, 0.0, ridge=0.0)


def test_merged_pair_kl_ignores_how_the_pair_splits():
    lp0 = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), -1)
    male, female = torch.tensor([0]), torch.tensor([1])
    p = lp0.exp().clone()
    p[0, :2] = p[0, :2].sum() / 2  # rebalance the pair, keep its mass and the rest
    assert merged_pair_kl(lp0, p.log(), male, female).abs().item() < 1e-6
    q = lp0.exp().clone()
    q[0, 2], q[0, 3] = q[0, 3], q[0, 2]  # move mass among the other tokens
    assert merged_pair_kl(lp0, q.log(), male, female).item() > 0.01


# ------------------------------------------------------------------------------ per architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_lsdm_maps_keys_to_targets_and_keeps_keep_prompts(arch, models, corpus, cache):
    m = models[arch]
    P, K = edit_prompts(), keep_prompts()
    layer, role = 1, "subject_last"
    hp = LSDMHparams(**HP)
    site = site_batch(m, P, role)
    keep = site_batch(m, K, role, "none")
    z, _ = compute_targets(m, site, layer, hp, progress=False)  # deterministic: δ starts at 0
    z_name, out_name = act_name("resid_post", layer), act_name("mlp_out", layer)
    before = gather(m, site, [z_name])[z_name]
    keep_before = gather(m, keep, [out_name])[out_name]
    hash0 = m.weight_hash()
    delta = lsdm(m, P, layers=[layer], role=role, corpus=corpus, hparams=hp, keep_prompts=K,
                 cache_dir=cache, progress=False)
    try:
        assert delta.names == [m.mlp_out_name(layer)]
        after = group_mean(gather(m, site, [z_name])[z_name], site.group, site.n_groups)
        moved = (z - group_mean(before, site.group, site.n_groups)).norm(dim=-1)
        assert moved.min() > 1e-4, "the targets ask for a change"
        # the edited keys now produce their targets (exact solve: 4 columns + 16 keep < d_mlp)
        assert ((after - z).norm(dim=-1) / moved).max() < 1e-3
        keep_after = gather(m, keep, [out_name])[out_name]
        assert (keep_after - keep_before).abs().max() < 1e-4 * keep_before.abs().max() + 1e-6
        info = delta.info
        assert info["site"] == {"layers": [layer], "role": role, "source": "explicit"}
        assert info["diagnostics"]["target_residual_left"] < 1e-3
        assert info["diagnostics"]["layers"][0]["residual_norm"] > 0
    finally:
        delta.undo(m)
    assert m.weight_hash() == hash0


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_edited_model_has_the_balance_the_targets_promised(arch, models, corpus, cache):
    """At the last role every prompt is its own column; with an exact solve the edited model's
    pronoun gap on the edit prompts is the one the target optimisation reached (it ran only the
    blocks after the site on cached prefixes: this checks that shortcut end to end)."""
    from biaslens.metrics import pronoun_log_ratio

    m = models[arch]
    P = edit_prompts(2)
    b = m.encode(P)
    metric = pronoun_log_ratio(m, P)
    with torch.no_grad():
        gap0 = metric(m.last_logits(b))
    hp = LSDMHparams(**{**HP, "v_steps": 0, "v_newton_steps": 4, "v_tol": 0.0})
    delta = lsdm(m, P, layers=[1], role="last", corpus=corpus, hparams=hp, keep_prompts=[],
                 cache_dir=cache, progress=False)
    try:
        with torch.no_grad():
            gap1 = metric(m.last_logits(b))
        t = delta.info["diagnostics"]["targets"]
        assert t["newton_steps"] == 4
        assert abs(gap0.pow(2).mean().item() - t["initial_gap_sq"]) < 1e-4 * (1 + t["initial_gap_sq"])
        assert gap1.pow(2).mean().item() < 1e-3 * gap0.pow(2).mean().item() + 1e-9
    finally:
        delta.undo(m)
    # with a tolerance the steps stop once the mean squared gap is below it, and the edit has it
    tol = 0.1 * gap0.pow(2).mean().item()
    delta = lsdm(m, P, layers=[1], role="last", corpus=corpus, keep_prompts=[], cache_dir=cache,
                 hparams=LSDMHparams(**{**HP, "v_steps": 0, "v_newton_steps": 4, "v_tol": tol}),
                 progress=False)
    try:
        with torch.no_grad():
            gap2 = metric(m.last_logits(b))
        t = delta.info["diagnostics"]["targets"]
        assert t["newton_steps"] < 4 and t["gap_sq_after_newton"] <= tol
        assert gap2.pow(2).mean().item() <= 1.01 * tol
    finally:
        delta.undo(m)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("role", ["subject_last", "last"])
def test_kv_suffix_runner_equals_the_full_suffix_run(arch, role, models):
    """The target runner that re-enters after the site on cached prefixes gives the log-probs
    and the gradient in δ of the one that re-runs every position from the layer on."""
    from biaslens.edit.keys import site_batch
    from biaslens.edit.targets import KVSuffixRunner, SuffixRunner

    m = models[arch]
    site = site_batch(m, edit_prompts(2), role, "none")
    fast = KVSuffixRunner.build(m, site, 0, 256)
    slow = SuffixRunner(m, site, 0, 256)
    assert isinstance(fast, KVSuffixRunner)
    assert any(skip > 0 for _, skip in fast.engines.values())  # prefixes really come from a cache
    torch.manual_seed(0)
    pair = fast.engines[fast.buckets[0][0]][0]._cols[0]  # the two pronoun ids
    for idx in fast.buckets:
        d = torch.randn(len(idx), m.d_model) * 0.5
        lps, grads = [], []
        for run, full in ((fast, True), (fast, False), (slow, True)):
            x = d.clone().requires_grad_(True)
            lp = run.logprobs(idx, x, full=full)
            (lp[:, pair[1]] - lp[:, pair[0]]).sum().backward()
            lps.append(lp.detach())
            grads.append(x.grad)
        torch.testing.assert_close(lps[0], lps[2], atol=1e-4, rtol=1e-4)
        gap = [lp[:, pair[1]] - lp[:, pair[0]] for lp in lps]
        torch.testing.assert_close(gap[1], gap[2], atol=1e-5, rtol=1e-4)  # pronoun columns only
        torch.testing.assert_close(grads[0], grads[2], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1], grads[2], atol=1e-5, rtol=1e-4)
        assert grads[2].abs().max() > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_two_layers_spread_the_residual_and_undo_is_exact(arch, models, corpus, cache):
    m = models[arch]
    originals = m.snapshot()
    hash0 = m.weight_hash()
    delta = lsdm(m, edit_prompts(), layers=[0, 1], role="last", corpus=corpus,
                 hparams=LSDMHparams(**{**HP, "mom2_weight": 1e-3}), keep_prompts=[],
                 cache_dir=cache, progress=False)
    assert sorted(delta.names) == sorted(m.mlp_out_name(l) for l in (0, 1))
    assert len(list(cache.glob("*.chol-*.safetensors"))) == 2  # the factors sit beside the statistics
    d = delta.info["diagnostics"]
    assert d["n_columns"] == d["n_prompts"] == len(edit_prompts())  # last role: one per prompt
    assert m.weight_hash() != hash0
    delta.undo(m)
    assert m.weight_hash() == hash0
    assert all(torch.equal(m.param(n), t) for n, t in originals.items())
    delta.apply(m)
    assert all(torch.equal(m.param(n), delta.updated[n]) for n in delta.names)
    delta.undo(m)


def test_nan_edit_is_refused_and_weights_restored(models, corpus, cache, monkeypatch):
    m = models["gpt2"]
    hash0 = m.weight_hash()
    real = lsdm_mod.least_squares_update
    calls = []

    def second_call_nan(*a, **k):  # layer 0 is edited fine, layer 1 returns NaN
        calls.append(1)
        out = real(*a, **k)
        return out if len(calls) == 1 else out * float("nan")

    monkeypatch.setattr(lsdm_mod, "least_squares_update", second_call_nan)
    with pytest.raises(BiasLensError, match="not finite"):
        lsdm(m, edit_prompts(), layers=[0, 1], role="subject_last", corpus=corpus,
             hparams=LSDMHparams(**HP), keep_prompts=[], cache_dir=cache, progress=False)
    assert len(calls) == 2
    assert m.weight_hash() == hash0


def test_bad_site_input_is_refused(models, corpus, cache):
    m = models["gpt2"]
    for kw, msg in [(dict(layers=[7], role="last"), "out of range"),
                    (dict(layers=[1], role="prefix"), "role"),
                    (dict(layers="x,y", role="last"), "comma-separated")]:
        with pytest.raises(BiasLensError, match=msg):
            lsdm(m, edit_prompts(), corpus=corpus, cache_dir=cache, progress=False, **kw)
    with pytest.raises(BiasLensError, match="does not exist"):
        lsdm(m, edit_prompts(), layers=[1], role="last", corpus=corpus.parent / "missing.txt",
             progress=False)


# ------------------------------------------------------------------------------ key statistics
def test_key_covariance_equals_direct_second_moment_and_is_cached(models, corpus, cache, monkeypatch):
    m = models["neox"]
    C = key_covariance(m, 1, corpus, n_tokens=600, seq_len=32, cache_dir=cache, progress=False)
    windows = cov_mod.corpus_windows(m, corpus, 600, 32)
    assert sum(len(w) for w in windows) == 600
    keys = []
    for w in windows:  # one unpadded sequence at a time: the reference
        _, c = m.bridge.run_with_cache(torch.tensor([w]), names_filter=lambda n: n == act_name("mlp_key", 1))
        keys.append(c[act_name("mlp_key", 1)][0].double())
    k = torch.cat(keys)
    ref = k.T @ k / len(k)
    assert C.dtype == torch.float64
    assert torch.allclose(C, ref, rtol=1e-4, atol=1e-7)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and "-L1-" in files[0].name

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(cov_mod, "accumulate_second_moments", boom)
    assert torch.equal(key_covariance(m, 1, corpus, n_tokens=600, seq_len=32, cache_dir=cache,
                                      progress=False), C)
    # another corpus is another statistic
    other = cache.parent / "other.txt"
    other.write_text("The red box is on the table.\n" * 40)
    with pytest.raises(AssertionError, match="recomputed"):
        key_covariance(m, 1, other, n_tokens=600, seq_len=32, cache_dir=cache, progress=False)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BIASLENS_CACHE", str(tmp_path / "env"))
    assert cov_mod.cache_root() == tmp_path / "env"
    assert cov_mod.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("BIASLENS_CACHE")
    assert cov_mod.cache_root().parts[-3:] == (".cache", "biaslens", "cov")


def test_missing_corpus_is_a_clear_error(models, tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        key_covariance(models["gpt2"], 0, tmp_path / "nope.txt", cache_dir=tmp_path)


# ------------------------------------------------------------------------------ baselines
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_rome_is_rank_one_and_maps_the_mean_key(arch, models, corpus, cache):
    m = models[arch]
    P = edit_prompts()
    W0 = m.mlp_out_matrix(1).clone().double()
    delta = rome_rank_one(m, 1, P, role="subject_last", corpus=corpus,
                          hparams=dict(HP, v_steps=4), cache_dir=cache, progress=False)
    try:
        dW = m.mlp_out_matrix(1).double() - W0
        s = torch.linalg.svdvals(dW)
        assert s[1] < 1e-5 * s[0]
        assert delta.names == [m.mlp_out_name(1)] and delta.method == "rome"
    finally:
        delta.undo(m)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cda_trains_only_the_named_layers_and_lowers_its_loss(arch, models):
    m = models[arch]
    delta = counterfactual_finetune(m, [1], edit_prompts(1), keep_prompts(),
                                    hparams=CDAHparams(epochs=3, lr=5e-3, batch_size=8), progress=False)
    try:
        assert delta.names == [m.mlp_out_name(1)]
        d = delta.info["diagnostics"]
        assert d["final_loss"] < d["first_loss"]
        assert all(p.requires_grad for p in m.params.values())  # restored
    finally:
        delta.undo(m)


# ------------------------------------------------------------------------------ site, hparams
def test_site_from_effect_map_prefers_one_token_roles(models, tmp_path):
    from biaslens.locate import EffectMap

    roles = ["prefix", "subject_first", "subject_middle", "subject_last", "after_subject", "last"]
    mlp = np.zeros((3, len(roles)))
    mlp[:, 0] = 5.0  # prefix is strongest but cannot be keyed (several tokens per prompt)
    mlp[2, 5], mlp[0, 5] = 0.9, 0.7
    mlp[1, 3] = 0.4
    e = {"mlp": mlp}
    z = {"mlp": np.zeros_like(mlp)}
    em = EffectMap("tiny", "noise", "m", 10, [0, 1, 2], roles, e, z, z)
    path = em.save(tmp_path / "effects.json")
    site = lsdm_mod.resolve_site(models["gpt2"], edit_prompts(), "auto", "auto", path)
    assert site["role"] == "last" and site["layers"] == [0, 2] and site["source"] == "effect_map"
    assert site["effect_map"]["top_mlp_sites"][0]["role"] == "prefix"
    site = lsdm_mod.resolve_site(models["gpt2"], edit_prompts(), "1", "auto", em)
    assert site["layers"] == [1] and site["role"] == "last"


def test_hparams_json_roundtrip_and_unknown_fields(tmp_path):
    hp = LSDMHparams(mom2_weight=5.0, v_steps=3)
    hp.save(tmp_path / "h.json")
    assert LSDMHparams.from_json(tmp_path / "h.json") == hp
    (tmp_path / "bad.json").write_text(json.dumps({"mom2_wieght": 1}))
    with pytest.raises(DataFormatError, match="mom2_wieght"):
        LSDMHparams.from_json(tmp_path / "bad.json")
    with pytest.raises(DataFormatError, match="average_keys"):
        LSDMHparams(average_keys="sometimes")


def test_auto_site_runs_tracing_and_records_the_map(models, corpus, cache):
    """With tuning off, ``layers="auto"`` is the traced map's two best layers (tuned windows come
    from the same map: tests/unit/test_tune.py)."""
    m = models["llama"]
    delta = lsdm(m, edit_prompts(2), corpus=corpus, hparams=LSDMHparams(**HP), keep_prompts=[],
                 cache_dir=cache, progress=False, tune="off")
    try:
        site, emap = delta.info["site"], delta.info["effect_map"]
        assert site["source"] == "traced" and len(site["layers"]) == 2
        assert site["role"] in ("subject_first", "subject_last", "last")
        assert emap["method"] == "noise" and emap["top_mlp_sites"]
        best = max(emap["mlp_best_effect_by_role"][r] for r in ("subject_first", "subject_last", "last"))
        assert emap["mlp_best_effect_by_role"][site["role"]] == best
    finally:
        delta.undo(m)
