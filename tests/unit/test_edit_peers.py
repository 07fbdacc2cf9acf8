"""The projection peers of LSDM, DAMA and LEACE (biaslens.edit.projection, biaslens.edit.erasure): on
tiny models of every family they edit only the site's MLP output weight (and bias), undo exactly
and export as plain Hugging Face models; LEACE's folded weights are the eraser applied to the MLP
output; on the organism each cuts the contrast on the prompts it was fitted on, LEACE erases the
stereotype linearly, and the validation sweep chooses within the retention bounds."""

from __future__ import annotations

import json

import pytest
import torch

import biaslens
from biaslens import organism
from biaslens.edit import DAMAHparams, LEACEHparams, dama, leace
from biaslens.edit.projection import mlp_out_names, pls_directions, stereotype_labels
from biaslens.edit.keys import gather, site_batch
from biaslens.edit.erasure import eraser_map, fit_eraser, fold_eraser
from biaslens.errors import BiasLensError, DataFormatError
from biaslens.hooks import act_name
from biaslens.testing import organism_edit_sample, organism_keep_sample
from conftest import ARCHS

pytestmark = pytest.mark.usefixtures("one_thread")

#: both sides of the stereotype (planted female rates above and below 0.5)
OCCS = ["nurse", "plumber", "secretary", "mechanic", "librarian", "carpenter"]
METHODS = {"dama": (dama, {"rank": 2}), "leace": (leace, {})}


def edit_prompts(n_templates: int = 4):
    return organism_edit_sample(OCCS, "train", n_templates)


def keep_prompts():
    return organism_keep_sample()


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory):
    """The suite's tiny models, plus a LLaMA with its own Metaspace (SentencePiece-style) tokenizer."""
    from biaslens.testing import tiny_model

    out = {a: biaslens.load(str(d)) for a, d in tiny_dirs.items()}
    out["llama-metaspace"] = biaslens.load(str(tiny_model(
        "llama", tmp_path_factory.mktemp("peers") / "llama-sp", n_layers=3)))
    g = torch.Generator().manual_seed(0)
    for m in out.values():  # freshly initialised biases are 0: give them values, so folding shows
        for layer in range(m.n_layers):
            for n in mlp_out_names(m, layer)[1:]:
                b = m.param(n)
                m.restore({n: 0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype)})
    return out


FAMILIES = ARCHS + ("llama-metaspace",)


def _probe_logits(module, ids):
    with torch.no_grad():
        return module(ids).logits.float()


# ------------------------------------------------------------------------------ every family
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", FAMILIES)
def test_peer_edits_only_the_site_undoes_exactly_and_exports(arch, method, models, tmp_path):
    from transformers import AutoModelForCausalLM

    from biaslens.export import _probe_ids, export

    m = models[arch]
    fn, hp = METHODS[method]
    hash0 = m.weight_hash()
    before = m.snapshot()
    delta = fn(m, edit_prompts(), layers=[1], role="last", hparams=hp, keep_prompts=keep_prompts(),
               progress=False)
    try:
        site = mlp_out_names(m, 1)
        has_bias = not arch.startswith("llama")
        assert len(site) == (2 if has_bias else 1)  # LLaMA's down_proj has no bias
        assert delta.names == sorted(site), "only layer 1's MLP output weight (and bias) change"
        assert all(not torch.equal(delta.original[n], delta.updated[n]) for n in delta.names)
        assert delta.method == method and delta.info["site"]["layers"] == [1]
        assert delta.info["validation"] is None  # explicit layers and rank: nothing to choose
        if method == "leace":
            layer = delta.info["diagnostics"]["layers"][0]
            assert layer["bias"] == ("folded" if has_bias else "absent: constant dropped")
            assert layer["residual_cross_covariance"] < 1e-8
        out = export(m, tmp_path / "out", delta=delta)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["method"] == method
        assert {c["name"] for c in manifest["changed_tensors"]} == set(site)
        reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        saved = reloaded.state_dict()
        changed = {n for n in m.params if not torch.equal(saved[n], before[n])}
        assert changed == set(site), "the export changes only existing tensors of the site"
        ids = _probe_ids(m)
        torch.testing.assert_close(_probe_logits(reloaded, ids), _probe_logits(m.plain_module(), ids),
                                   atol=1e-5, rtol=1e-5)
    finally:
        delta.undo(m)
    assert m.weight_hash() == hash0


@pytest.mark.parametrize("method, hp", [("dama", {"rank": 1, "signal": "logodds"}),
                                        ("dama", {"rank": 2, "keep_rank": 0}), ("leace", {"keep": "none"})])
def test_several_layers_are_edited_in_order(method, hp, models):
    """Two layers: both change (each fitted on the model edited at the one before), only their MLP
    outputs, and undo is exact; also the log-odds signal, the unconstrained projection and LEACE
    fitted without the definitional prompts. (GPT-2: a sequential block, so layer 0's MLP at the last token
    already sees the occupation through attention; in NeoX's parallel block it does not, and
    both methods rightly find nothing there.)"""
    m = models["gpt2"]
    hash0 = m.weight_hash()
    fn = METHODS[method][0]
    delta = fn(m, edit_prompts(), layers=[0, 1], role="last", hparams=hp, keep_prompts=keep_prompts(),
               progress=False)
    try:
        assert delta.names == sorted(mlp_out_names(m, 0) + mlp_out_names(m, 1))
        assert [d["layer"] for d in delta.info["diagnostics"]["layers"]] == [0, 1]
        cls = DAMAHparams if method == "dama" else LEACEHparams
        assert delta.hparams == cls(**hp).to_dict()  # the manifest names what produced the edit
    finally:
        delta.undo(m)
    assert m.weight_hash() == hash0


@pytest.mark.parametrize("arch", FAMILIES)
def test_folded_leace_is_the_eraser_on_the_mlp_output(arch, models):
    """The folded weights give the logits of the unedited model with the package's eraser
    applied to layer 1's MLP output at every position (without a bias, the eraser minus its
    constant M μ, which LLaMA's down_proj cannot hold)."""
    m = models[arch]
    P = edit_prompts()
    fit, labels = stereotype_labels(P)
    site = site_batch(m, fit, "last", "none")
    eraser, diag = fit_eraser(m, site, 1, labels)
    assert diag["eraser_rank"] == 1 and diag["class_mean_gap_after"] < 1e-6 * diag["class_mean_gap_before"]
    M, shift = eraser_map(eraser)
    has_bias = len(mlp_out_names(m, 1)) == 2

    def erase(act, hook):
        out = eraser(act.double())
        if not has_bias:
            out = out - shift
        return out.to(act.dtype)

    batch = m.encode(P[:8])
    with torch.no_grad():
        want = m.forward(batch, fwd_hooks=[(act_name("mlp_out", 1), erase)])
        plain = m.forward(batch)
    snap = m.snapshot(mlp_out_names(m, 1))
    try:
        info = fold_eraser(m, 1, eraser)
        with torch.no_grad():
            got = m.forward(batch)
    finally:
        m.restore(snap)
    mask = batch.attention_mask.bool()
    assert (want - plain)[mask].abs().max() > 1e-4, "the eraser changes the logits"
    scale = float(want[mask].abs().max())
    torch.testing.assert_close(got[mask], want[mask], atol=2e-5 * max(1.0, scale), rtol=1e-5)
    if not has_bias:
        assert info["shift_dropped_norm"] == pytest.approx(float(shift.norm()))


def test_pls_directions_are_nipals_x_weights():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    y = X[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(200, generator=g, dtype=torch.float64)
    B = pls_directions(X, y[:, None], 4)
    assert B.shape == (12, 4)
    torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    Xc, yc = X - X.mean(0), y - y.mean()
    first = Xc.T @ yc
    assert abs(float(B[:, 0] @ first / first.norm())) == pytest.approx(1.0, abs=1e-12)
    T = Xc @ B  # NIPALS scores of successive components are uncorrelated (deflated X)
    scores = [T[:, 0]]
    Xd = Xc.clone()
    for k in range(3):
        t = Xd @ B[:, k]
        Xd = Xd - torch.outer(t, Xd.T @ t / (t @ t))
        scores.append(Xd @ B[:, k + 1])
    S = torch.stack(scores, 1)
    off = S.T @ S - torch.diag((S * S).sum(0))
    assert off.abs().max() < 1e-8 * (S * S).sum(0).max()
    # a signal the first score explains fully (orthogonal columns, y = column 0) stops there
    Q, _ = torch.linalg.qr(Xc)
    Xo = Q * torch.linspace(1, 3, 12, dtype=torch.float64)
    assert pls_directions(Xo, Xo[:, :1], 5).shape[1] == 1


def test_nonfinite_and_noop_edits_are_refused_and_weights_restored(models, monkeypatch):
    from biaslens.edit import projection as dama_mod
    from biaslens.edit import erasure as leace_mod

    m = models["gpt2"]
    hash0 = m.weight_hash()
    real = leace_mod.eraser_map

    def nan_map(eraser):
        M, shift = real(eraser)
        return M * float("nan"), shift

    monkeypatch.setattr(leace_mod, "eraser_map", nan_map)
    with pytest.raises(BiasLensError, match="not finite"):
        leace(m, edit_prompts(), layers=[1], role="last", progress=False)
    assert m.weight_hash() == hash0
    monkeypatch.undo()
    monkeypatch.setattr(dama_mod, "fold_output_map", lambda *a, **k: {})
    with pytest.raises(BiasLensError, match="unchanged"):
        dama(m, edit_prompts(), layers=[1], role="last", hparams={"rank": 1}, progress=False)
    assert m.weight_hash() == hash0


def test_sweep_picks_the_smallest_contrast_that_keeps_the_bounds(models):
    """The validation sweep: the setting with the smallest contrast among those within bounds
    that lower it; a family's stronger settings are skipped once a weaker one broke a bound; the
    weights are restored after every candidate; no acceptable setting is refused."""
    from biaslens.edit.projection import sweep

    m = models["gpt2"]
    name = m.mlp_out_name(1)
    hash0 = m.weight_hash()
    table = {((1,), 1): (0.40, []), ((1,), 2): (0.30, ["perplexity"]), ((1,), 4): (0.10, []),
             ((2,), 1): (0.35, []), ((2,), 2): (0.60, [])}
    now: dict = {}

    class Fake:
        base = {"contrast": 0.5}

        def measure(self):
            assert not torch.equal(m.param(name), base_w), "measured on the edited model"
            return {"contrast": table[now["key"]][0]}

        def violations(self, r):
            return list(table[now["key"]][1])

    base_w = m.param(name).detach().clone()
    applied = []

    def apply(c):
        now["key"] = (tuple(c["layers"]), c["rank"])
        applied.append(now["key"])
        m.restore({name: m.param(name) + 1.0})

    cands = [{"layers": list(k[0]), "rank": k[1]} for k in table]
    best, rows = sweep(m, Fake(), cands, apply, [name], progress=False,
                       stop_after_failure=lambda c, f: c["layers"] == f["layers"] and c["rank"] > f["rank"])
    assert (best["layers"], best["rank"]) == ([2], 1)
    assert ((1,), 4) not in applied and rows[2]["skipped"]
    assert rows[4]["violations"] == ["no contrast reduction"] and not rows[4]["within_bounds"]
    assert m.weight_hash() == hash0
    table.update({k: (0.45, ["definitional accuracy"]) for k in table})
    with pytest.raises(BiasLensError, match="no setting reduced the validation contrast"):
        sweep(m, Fake(), cands, apply, [name], progress=False)
    assert m.weight_hash() == hash0


def test_bad_input_is_one_clear_error(models):
    m = models["gpt2"]
    only_female = [p for p in edit_prompts() if p.female_rate > 0.5]
    for fn in (dama, leace):
        with pytest.raises(BiasLensError, match="both sides"):
            fn(m, only_female, layers=[1], role="last", progress=False)
        with pytest.raises(BiasLensError, match="out of range"):
            fn(m, edit_prompts(), layers=[7], role="last", progress=False)


def test_hyperparameters_load_and_are_checked(tmp_path):
    hp = DAMAHparams.from_dict({"rank": 3, "ranks": [4, 1, 2], "signal": "logodds"})
    assert hp.ranks == (1, 2, 4) and hp.to_dict()["ranks"] == [1, 2, 4]
    path = tmp_path / "dama.json"
    hp.save(path)
    assert DAMAHparams.from_json(path) == hp
    assert LEACEHparams.from_dict({"keep": "none", "method": "orth"}).method == "orth"
    for cls, bad in ((DAMAHparams, {"rank": -1}), (DAMAHparams, {"ranks": []}),
                     (DAMAHparams, {"ranks": [0, 2]}), (DAMAHparams, {"signal": "gender"}),
                     (DAMAHparams, {"nope": 1}), (LEACEHparams, {"keep": "all"}),
                     (LEACEHparams, {"max_ppl_rise": float("nan")})):
        with pytest.raises(DataFormatError):
            cls.from_dict(bad)


# ------------------------------------------------------------------------------ the organism
@pytest.fixture(scope="module")
def org_data(organism):
    """A seeded, occupation-balanced sample of the organism's edit prompts and its definitional
    prompts of the edit templates (the prompts both methods fit on)."""
    from biaslens.defaults import balanced_sample, defaults_for

    d = defaults_for(organism)
    return (balanced_sample(d.occupation_prompts("edit", "edit"), 1500),
            balanced_sample(d.definitional_prompts("edit"), 800))


def _contrast(m, prompts):
    from biaslens.evaluate.contrast import stereotype_contrast

    return stereotype_contrast(m, prompts)["mean_abs_contrast"]


def _definitional(m, prompts):
    from biaslens.evaluate import definitional_accuracy

    return definitional_accuracy(m, prompts)["accuracy"]


def test_leace_on_the_organism_erases_the_stereotype_linearly(organism, org_data):
    """At the organism's located site (layer 0's MLP output at the last token) LEACE removes the
    stereotype from the fitted prompts: the class means of the erased outputs coincide, a
    least-squares probe on them predicts the label no better than a constant (R² ≈ 0, where it
    explained most of it before), and the contrast on those prompts falls by more than half.
    Fitting with the definitional prompts as stereotype-neutral keeps more of their accuracy than
    fitting without them, but not all of it: at this site the stereotype and the definitional
    gender share one direction (measured: see biaslens.edit.projection's docstring)."""
    P, K = org_data
    c0 = _contrast(organism, P)
    fit, labels = stereotype_labels(P)
    site = site_batch(organism, fit, "last", "none")
    z = torch.tensor(labels) > 0
    y = z.double()
    name = act_name("mlp_out", 0)

    def r2(x):  # in-sample R² of a least-squares probe with an intercept (the erased direction
        # is a null direction of the outputs: singular values below 1e-6 of the largest count as 0)
        A = torch.cat([x - x.mean(0), torch.ones(len(x), 1, dtype=x.dtype)], 1)
        pred = A @ torch.linalg.lstsq(A, y[:, None], rcond=1e-6, driver="gelsd").solution[:, 0]
        return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())

    x0 = gather(organism, site, [name])[name].double()
    assert r2(x0) > 0.5, "before the erasure a linear probe separates the labels"
    accuracy = {}
    for keep in ("definitional", "none"):
        delta = leace(organism, P, layers=[0], role="last", keep_prompts=K,
                      hparams={"keep": keep}, progress=False)
        try:
            x = gather(organism, site, [name])[name].double()
            gap0 = (x0[z].mean(0) - x0[~z].mean(0)).norm()
            assert (x[z].mean(0) - x[~z].mean(0)).norm() < 1e-5 * gap0, "class means coincide"
            assert r2(x) < 1e-6
            assert _contrast(organism, P) < 0.5 * c0
            accuracy[keep] = _definitional(organism, K)
        finally:
            delta.undo(organism)
    assert accuracy["definitional"] > accuracy["none"] + 0.02


def test_dama_on_the_organism_cuts_the_contrast_or_keeps_definitional_gender(organism, org_data):
    """DAMA as published (no keep constraint) at the located site cuts the contrast on the prompts
    it was fitted on by more than half and costs definitional accuracy; kept orthogonal to the
    definitional gender direction (the default) the projection leaves that direction's component
    of the definitional outputs exactly as it was and keeps definitional accuracy within two
    points, losing under a fifth of what the published projection loses. On the organism no rank
    does both: 98% of the occupations' stereotype gap at this site lies along the definitional
    gender direction."""
    from biaslens.defaults import defaults_for
    from biaslens.edit.projection import gender_subspace, site_outputs

    P, K = org_data
    every = defaults_for(organism).definitional_prompts()  # the suite's definitional prompts
    c0, k0 = _contrast(organism, P), _definitional(organism, every)
    delta = dama(organism, P, layers=[0], role="last", hparams={"rank": 1, "keep_rank": 0},
                 keep_prompts=K, progress=False)
    try:
        assert _contrast(organism, P) < 0.5 * c0
        k_published = _definitional(organism, every)
    finally:
        delta.undo(organism)
    G = gender_subspace(organism, K, 0, "last", 1)
    keep_site = site_batch(organism, K, "last", "none")
    along0 = site_outputs(organism, keep_site, 0) @ G
    delta = dama(organism, P, layers=[0], role="last", hparams={"rank": 1}, keep_prompts=K,
                 progress=False)
    try:
        assert delta.info["diagnostics"]["layers"][0]["max_overlap_with_definitional"] < 1e-8
        along = site_outputs(organism, keep_site, 0) @ G  # the definitional gender component
        assert (along - along0).abs().max() < 1e-4 * along0.abs().max()
        k_kept = _definitional(organism, every)
        # measured: published 0.997 -> 0.79, constrained -> 0.986 (the organism's suite prompts)
        assert k_kept >= k0 - 0.02 and k0 - k_kept < 0.2 * (k0 - k_published)
    finally:
        delta.undo(organism)


@pytest.mark.slow  # ~60 s: tracing, then every rank x layer set scored on the validation templates
def test_dama_default_chooses_on_validation_within_the_bounds():
    """``dama(model)`` with no arguments on the LLaMA organism: the site from tracing, the rank
    and layers from the validation sweep (measured: layer 0, rank 1), the choice the smallest
    validation contrast among the rows within the bounds that lower it, all in ``info``. Should
    the data ever leave no such row, the refusal names each candidate's broken bound and leaves
    the weights as they were."""
    m = biaslens.load("organism-llama")
    hash0 = m.weight_hash()
    try:
        delta = dama(m, progress=False)
    except BiasLensError as exc:
        assert "within the retention bounds" in str(exc) and "rank=1" in str(exc)
        assert m.weight_hash() == hash0
        return
    try:
        v = delta.info["validation"]
        assert v["chosen"] == {"layers": delta.info["site"]["layers"], "rank": delta.info["rank"]}
        rows = [r for r in v["sweep"] if "contrast" in r]
        assert len(rows) >= 3 and {"base", "bounds", "objective"} <= set(v)
        chosen = next(r for r in rows if r["layers"] == v["chosen"]["layers"] and r["rank"] == v["chosen"]["rank"])
        assert chosen["within_bounds"] and chosen["contrast"] < v["base"]["contrast"]
        assert chosen["contrast"] == min(r["contrast"] for r in rows if r["within_bounds"])
        assert delta.names == sorted(n for l in chosen["layers"] for n in mlp_out_names(m, l))
    finally:
        delta.undo(m)
    assert m.weight_hash() == hash0


@pytest.mark.slow  # ~60 s on a shared 2-core machine: the suite measured before and after
def test_edit_cli_runs_leace(tiny_dirs, tmp_path):
    """``biaslens edit --method leace`` at explicit layers: the exported folder and the report
    name the method, the site and the changed tensors (``--method dama`` goes through the same
    dispatch; its rank sweep on the validation templates is too slow for a tiny-model test)."""
    from biaslens.cli import main

    occ = tmp_path / "occ.txt"
    occ.write_text("nurse,89.6\nplumber,0.7\nsecretary,94.6\nmechanic,1.8\n")
    out = tmp_path / "leace"
    argv = ["edit", "--method", "leace", "--model", str(tiny_dirs["opt"]), "--layers", "1",
            "--role", "last", "--occupations", str(occ), "--limit", "40", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "leace" and report["site"]["layers"] == [1]
    assert {c["name"] for c in report["changed_tensors"]} == {
        "model.decoder.layers.1.fc2.weight", "model.decoder.layers.1.fc2.bias"}
    assert json.loads((out / "model" / "manifest.json").read_text())["method"] == "leace"
