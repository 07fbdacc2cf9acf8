"""Locate on a model with a hand-planted bias mechanism, EffectMap round trip, CLI.

The planted model is a small random GPT-2 with the real GPT-2 BPE where we set weights so that
one MLP neuron (layer 1, neuron 7) reads a direction ``u`` added to the embeddings of the last
token of some occupations and writes the " she" − " he" unembedding direction; one attention head
at layer 2 (uniform attention, zero QK) moves that direction to the last token. Tracing must find
the neuron's MLP at the subject's last token, and the mover's attention at the last token.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

PLANT_LAYER, PLANT_NEURON, MOVER_LAYER = 1, 7, 2
# the planted direction goes on the last token of each (" librarian" is " l" + "ibrarian")
PLANTED = (" nurse", " secretary", " dancer", " librarian", " housekeeper")
PROMPTS = [(f"The {o.strip()} said that", o.strip()) for o in PLANTED] + [
    ("My dancer thinks that", "dancer"),
    ("The hospital nurse was happy because", "hospital nurse"),
]


def build_planted(folder, seed: int = 0):
    """Save the planted GPT-2 (see module docstring) to ``folder``."""
    from conftest import gpt2_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = gpt2_tokenizer()
    D = 64
    m = GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=3, n_head=4, vocab_size=len(tok), n_positions=64))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        wte = m.transformer.wte.weight  # tied with lm_head
        she, he = tok(" she")["input_ids"][0], tok(" he")["input_ids"][0]
        d = wte[she] - wte[he]
        d = (d - d.mean()) / (d - d.mean()).norm()
        u = torch.randn(D, generator=g)
        u = u - u.mean()
        u = u - (u @ d) * d
        u = u / u.norm()
        scale = wte.norm(dim=1).mean()
        for w in PLANTED:
            wte[tok(w)["input_ids"][-1]] += 1.5 * scale * u
        mlp = m.transformer.h[PLANT_LAYER].mlp  # Conv1D weights are [in, out]
        mlp.c_fc.weight[:, PLANT_NEURON] = 4.0 * u
        mlp.c_fc.bias[PLANT_NEURON] = -15.0  # fires only on a clean planted token
        mlp.c_proj.weight[PLANT_NEURON, :] = 0.03 * d
        attn = m.transformer.h[MOVER_LAYER].attn
        attn.c_attn.weight.zero_()
        attn.c_attn.bias.zero_()  # q = k = 0: uniform causal attention
        attn.c_attn.weight[:, 2 * D] = d  # head 0 value reads the d direction
        attn.c_proj.weight.zero_()
        attn.c_proj.bias.zero_()
        attn.c_proj.weight[0, :] = 0.3 * d
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import biaslens

    return biaslens.load(build_planted(tmp_path_factory.mktemp("planted") / "m"))


@pytest.fixture(scope="module")
def noise_map(planted):
    from biaslens.locate.noise import trace_noise

    return trace_noise(planted, PROMPTS, n_samples=6, progress=False, n_boot=200)


@pytest.fixture(scope="module")
def attr_map(planted):
    from biaslens.locate.attribution import attribution_patch

    return attribution_patch(planted, PROMPTS, n_samples=6, n_boot=200)


def test_planted_model_is_biased_where_planted(planted):
    from biaslens.metrics import pronoun_log_ratio

    b = planted.encode(PROMPTS)
    with torch.no_grad():
        m = pronoun_log_ratio(planted, PROMPTS)(planted.last_logits(b))
        _, cache = planted.run_with_cache(b, [f"blocks.{PLANT_LAYER}.mlp.hook_post"])
    act = cache[f"blocks.{PLANT_LAYER}.mlp.hook_post"][..., PLANT_NEURON]
    assert (m > 0.5).all(), m
    assert torch.equal(act.argmax(1), b.index("subject_last"))  # fires at the subject's last token


def test_noise_tracing_ranks_the_planted_site_first(noise_map):
    top = noise_map.top_sites(1, component="mlp")[0]
    assert (top.component, top.layer, top.role) == ("mlp", PLANT_LAYER, "subject_last")
    assert top.effect > 0.5 and top.ci_low > 0.3
    others = [s.effect for s in noise_map.top_sites(50, component="mlp")[1:] if s.role != "subject_first"]
    assert max(others) < 0.2
    # the mover: attention at the last token of the layer that moves the signal
    att = noise_map.top_sites(1, component="attn")[0]
    assert (att.layer, att.role) == (MOVER_LAYER, "last") and att.effect > 0.8
    assert noise_map.best_role("mlp") == "subject_last"
    assert noise_map.best_layers("mlp", k=1) == [PLANT_LAYER]
    assert noise_map.meta["te"] > 0.3


def test_attribution_ranks_the_planted_site_first_and_agrees(attr_map, noise_map):
    from biaslens.locate import agreement

    top = attr_map.top_sites(1, component="mlp")[0]
    assert (top.layer, top.role) == (PLANT_LAYER, "subject_last")
    att = attr_map.top_sites(1, component="attn")[0]
    assert (att.layer, att.role) == (MOVER_LAYER, "last")
    agree = agreement(attr_map, noise_map)
    assert agree["mlp"]["pearson"] > 0.9 and agree["attn"]["pearson"] > 0.9


def test_swap_nie_ranks_the_planted_neuron_first(planted):
    from biaslens.locate.swap import trace_swap

    em = trace_swap(planted, PROMPTS, "man", top_n=5, progress=False, n_boot=200)
    best = em.neurons[0]
    assert (best["layer"], best["neuron"]) == (PLANT_LAYER, PLANT_NEURON)
    assert best["effect"] > 10 * abs(em.neurons[1]["effect"])
    assert best["ci_low"] > 0
    assert em.meta["te"] > 0.5  # "man" moves the prompts toward " he"
    top = em.top_sites(1, component="mlp")[0]
    assert (top.layer, top.role) == (PLANT_LAYER, "subject_last")
    assert np.asarray(em.heads["effects"]).shape == (planted.n_layers, planted.n_heads)
    head_top = np.unravel_index(np.nanargmax(em.heads["effects"]), em.heads["effects"].shape)
    assert tuple(int(i) for i in head_top) == (MOVER_LAYER, 0)  # the mover head


def test_window_and_sever(planted):
    from biaslens.locate.noise import trace_noise

    em = trace_noise(planted, PROMPTS[:3], n_samples=3, window=3, sever=("mlp",), progress=False,
                     n_boot=50, components=("resid", "mlp"))
    # a 3-layer window around any layer covers layer 1: every layer restores the neuron
    j = em.roles.index("subject_last")
    assert (em.effects["mlp"][:, j] > 0.5).all()
    # severing the MLP path removes most of what the residual at the subject carries at layer 0
    assert em.effects["resid"][0, j] > 0.8
    assert em.effects["resid_sever_mlp"][0, j] < 0.4 * em.effects["resid"][0, j]
    # ... but not after the planted layer, where the signal is already in the residual
    assert em.effects["resid_sever_mlp"][2, j] > 0.8 * em.effects["resid"][2, j]
    assert "resid_sever_mlp" not in {s.component for s in em.top_sites(10)}


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_effect_map_round_trip(noise_map, tmp_path):
    from biaslens.locate import EffectMap

    path = noise_map.save(tmp_path / "effects.json")
    d = json.loads(path.read_text())
    for key in ("model", "method", "metric", "n_prompts", "layers", "roles", "effects", "ci_low", "ci_high"):
        assert key in d
    assert {"subject_first", "subject_last", "last"} <= set(d["roles"])
    assert len(d["effects"]["mlp"]) == len(d["layers"]) and len(d["effects"]["mlp"][0]) == len(d["roles"])
    back = EffectMap.load(path)
    assert back.top_sites(5) == noise_map.top_sites(5)
    for c in noise_map.effects:
        np.testing.assert_array_equal(back.effects[c], noise_map.effects[c])  # NaN round-trips
        np.testing.assert_array_equal(back.per_prompt[c], noise_map.per_prompt[c])
    assert back.per_prompt["mlp"].shape == (len(PROMPTS), 3, len(d["roles"]))
    # the per-prompt values average to the effect, and the CI brackets it
    np.testing.assert_allclose(np.nanmean(noise_map.per_prompt["mlp"], 0), noise_map.effects["mlp"])
    ok = np.isfinite(noise_map.effects["mlp"])
    assert (noise_map.ci_low["mlp"][ok] <= noise_map.effects["mlp"][ok] + 1e-12).all()
    assert (noise_map.ci_high["mlp"][ok] >= noise_map.effects["mlp"][ok] - 1e-12).all()


def test_bad_effect_map_file(tmp_path):
    from biaslens.errors import DataFormatError
    from biaslens.locate import EffectMap

    p = tmp_path / "e.json"
    p.write_text('{"model": "x"}')
    with pytest.raises(DataFormatError, match="missing keys"):
        EffectMap.load(p)


def test_figures(noise_map, tmp_path):
    from biaslens.locate.plots import heatmap_figure, layer_line_figure, write_html

    fig = heatmap_figure(noise_map)
    assert len(fig.data) == 3 and list(fig.data[1].x) == noise_map.roles
    assert "CI" in fig.data[0].hovertemplate
    out = write_html([fig, layer_line_figure(noise_map)], tmp_path / "h.html")
    assert out.read_text().count("plotly") > 2


def test_cli_locate(planted, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t, "subject": s}) for t, s in PROMPTS[:3]) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "biaslens.cli", "locate", "--model", str(planted.path), "--prompts",
           str(prompts), "--samples", "2", "--components", "mlp,attn", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads((out / "effects.json").read_text())
    assert set(d["effects"]) == {"mlp", "attn"} and d["n_prompts"] == 3 and d["method"] == "noise"
    assert (out / "heatmap.html").stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr  # refuses to overwrite
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "The nurse said", "subject": "nurse"}) + "\n{oops\n")
    r = subprocess.run(cmd[:7] + [str(bad), "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr


def test_bad_input_messages(planted):
    from biaslens.errors import BiasLensError
    from biaslens.locate import locate

    with pytest.raises(BiasLensError, match="no subject"):
        locate(planted, ["The nurse said that"])
    with pytest.raises(BiasLensError, match="unknown method"):
        locate(planted, PROMPTS, method="magic")
    with pytest.raises(BiasLensError, match="unknown components"):
        locate(planted, components=("mlp", "heads"))


def test_any_model_gets_default_prompts_from_the_shipped_bank(planted):
    """Without prompts a model that is not the organism traces the bank's edit prompts: a
    balanced sample over occupations, never a test template or a held-out occupation."""
    from biaslens.defaults import defaults_for, templates
    from biaslens.locate import default_prompts

    prompts = default_prompts(planted, max_prompts=24, seed=0)
    assert defaults_for(planted).kind == "general" and len(prompts) == 24
    assert len({p.occupation for p in prompts}) == 24  # one per occupation before any repeats
    edit = {t for t, _, _ in templates("edit")}
    assert all(p.template_split == "edit" and p.occupation_split == "edit" for p in prompts)
    assert all(p.text.replace(p.subject, "{occupation}", 1) in edit for p in prompts)


def test_oversized_prompt_input_is_refused_before_tokenising(tmp_path):
    """A document passed as a prompt (a 20 MB line once tried to allocate 61 GB) is refused on
    reading, naming the line; an oversized file is refused unread."""
    import json as _json

    from biaslens.errors import DataFormatError
    from biaslens.locate import cli as lcli

    f = tmp_path / "p.jsonl"
    f.write_text(_json.dumps({"text": "The nurse said that", "subject": "nurse"}) + "\n"
                 + _json.dumps({"text": "The nurse " + "very " * 5000 + "said", "subject": "nurse"}) + "\n")
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: a prompt line of 25,"):
        lcli.read_prompts(f)
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as fh:
        fh.truncate(lcli.MAX_PROMPTS_BYTES + 1)
    with pytest.raises(DataFormatError, match="MB"):
        lcli.read_prompts(big)
