"""The locate engine against TransformerLens ``patching`` on the speed benchmark's own sites.

benchmarks/locate.py times biaslens against TransformerLens on a GPT-2-small-shaped model (random
weights, real GPT-2 BPE): 10 occupation prompts, each corrupted by a word of the same token
length, residual / MLP-output / attention-output sites at every layer x position, the pronoun
log-ratio at each prompt's last token. This test runs the same setup (the benchmark's own
``Setup``) and checks the numbers the benchmark times: the engine with no-op skipping on and off
equals ``get_act_patch_resid_pre / mlp_out / attn_out`` per (layer, position, prompt) to 1e-4
(the benchmark's own bound; measured ~2e-6), and attribution patching agrees with the exact
effects to Pearson r >= 0.95.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "locate.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    import biaslens
    from biaslens.data import GPT2_BPE
    from biaslens.testing import gpt2_small

    spec = importlib.util.spec_from_file_location("locate_benchmark", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = biaslens.load(gpt2_small(tmp_path_factory.mktemp("gpt2-small") / "model", GPT2_BPE))
    return bench, bench.Setup(model, 10)


@pytest.mark.slow
def test_engine_equals_transformer_lens_on_the_benchmark_sites(setup):
    bench, s = setup
    assert (s.L, s.T, s.B) == (12, 6, 10) and len(set(s.xb.lengths.tolist())) > 1  # padding too
    ref = s.tl()
    ours, engine = s.ours()
    every, engine_all = s.ours(skip_noops=False)
    assert engine.fused and engine.skip_prefix and engine_all.stats["noop_rows"] == 0
    assert engine.stats["noop_rows"] > 0
    # attention-output patches ran the next block from m + MLP(m), block l's MLP alone
    assert engine.stats["mlp_tokens"] > 0 and engine_all.stats["mlp_tokens"] > 0
    for c in ref:
        assert ours[c].shape == ref[c].shape == (s.L, s.T, s.B)
        torch.testing.assert_close(ours[c], ref[c].to(ours[c].dtype), atol=1e-4, rtol=0)
        torch.testing.assert_close(every[c], ref[c].to(every[c].dtype), atol=1e-4, rtol=0)
    exact = torch.cat([(ours[c] - engine.base_metric[None, None]).flatten() for c in ref])
    assert exact.abs().max() > 1e-2  # the patches move the metric
    attr, base_metric = s.attribution()
    torch.testing.assert_close(base_metric, engine.base_metric, atol=1e-5, rtol=0)
    approx = torch.cat([attr[c].flatten() for c in ref])
    assert bench.pearson(exact, approx) >= 0.95
