"""The engine's structural shortcuts change no number (tiny GPT-2, real BPE).

- An attention-output patch at layer l is run as the next block's input set to m + MLP(m)
  (m = resid_pre + the source's attention output) at its positions; block l runs its MLP there
  only (``stats["mlp_tokens"]``). Against the bridge's own blocks (``fused=False``, which run
  block l whole).
- A patch of the final block's attention or MLP output at a position other than the last
  reaches no logit the metric reads: the base value, with no compute, even with no-op
  skipping off.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAN = [("The nurse said that", "nurse"), ("The software engineer was promoted because", "software engineer"),
         ("My dancer", "dancer")]
CORRUPT = [("The man said that", "man"), ("The hardware engineer was promoted because", "hardware engineer"),
           ("My father", "father")]


@pytest.fixture(scope="module")
def setup(tiny_dirs):
    import biaslens
    from biaslens.hooks import act_name
    from biaslens.locate.patching import Base, SourceRun
    from biaslens.metrics import pronoun_log_ratio

    model = biaslens.load(tiny_dirs["gpt2"])
    cb, xb = model.encode(CLEAN), model.encode(CORRUPT)
    rows = torch.arange(len(cb))
    hooks = [act_name(c, l) for c in ("resid_pre", "mlp_out", "attn_out") for l in range(model.n_layers)]
    base = Base(xb.input_ids, xb.attention_mask, xb.lengths, rows)
    return model, base, {"clean": SourceRun(cb, hooks, rows)}, pronoun_log_ratio(model, CLEAN)


def _engine(setup, **kw):
    from biaslens.locate.patching import PatchEngine

    model, base, sources, metric = setup
    return PatchEngine(model, base, dict(sources), metric, progress=False, **kw)


def test_attention_output_patches_run_the_mlp_alone_and_equal_the_bridge(setup):
    from biaslens.locate.patching import patch_attn_out_by_pos

    with torch.no_grad():
        fast, bridge = _engine(setup, skip_noops=False), _engine(setup, skip_noops=False, fused=False)
        a, b = patch_attn_out_by_pos(fast), patch_attn_out_by_pos(bridge)
    assert fast.fused and not bridge.fused and fast._fold_attn
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - fast.base_metric).abs().max() > 1e-3  # the patches matter
    assert fast.stats["mlp_tokens"] > 0 and bridge.stats["mlp_tokens"] == 0
    assert fast.stats["block_tokens"] < bridge.stats["block_tokens"]


def test_final_block_outputs_before_the_last_position_are_the_base_value(setup):
    from biaslens.hooks import act_name
    from biaslens.locate.patching import Patch, position_masks

    model = setup[0]
    L = model.n_layers
    with torch.no_grad():
        eng = _engine(setup, skip_noops=False)
        lengths = eng.base.lengths
        masks = position_masks(eng.base)
        variants = [(Patch(act_name(c, L - 1), L - 1, m),) for c in ("attn_out", "mlp_out") for m in masks]
        before = dict(eng.stats)
        vals = eng.run(variants).reshape(2, len(masks), -1)
        # the bridge with the clean value set there (position 1: before every row's last)
        src = eng.sources["clean"]
        for k, c in enumerate(("attn_out", "mlp_out")):
            hook = act_name(c, L - 1)

            def put(act, hook, clean=src.acts[hook][src.rows]):
                act = act.clone()
                act[:, 1] = clean[:, 1].to(act.dtype)
                return act

            logits = model.bridge.run_with_hooks(eng.base.input_ids, fwd_hooks=[(hook, put)],
                                                 attention_mask=eng.base.attention_mask)
            ref = eng.metric(logits[torch.arange(len(lengths)), lengths - 1])
            torch.testing.assert_close(vals[k, 1], ref.float(), atol=1e-5, rtol=0)
    for pos in range(len(masks)):
        early = pos < lengths - 1  # rows for which this position is before the last
        assert torch.equal(vals[:, pos, early], eng.base_metric[early].expand(2, -1))
    last = torch.stack([vals[:, int(n) - 1, r] for r, n in enumerate(lengths)], -1)
    assert (last - eng.base_metric).abs().max() > 1e-4  # at the last position they do act
    # only the last positions were computed: one row per (component, prompt), no block run
    assert eng.stats["unembed_rows"] - before["unembed_rows"] == 2 * len(lengths)
    assert eng.stats["block_tokens"] == before["block_tokens"]


@pytest.mark.parametrize("act", [None, "gelu_tanh", "gelu"])
@pytest.mark.parametrize("conv", [True, False])
def test_fused_matmul_equals_addmm_then_activation(act, conv):
    """The fused blocks' matmul (oneDNN with the activation fused in where this torch has it)
    gives addmm's numbers then the activation, to rounding, in both weight layouts; with
    ``torch.backends.mkldnn`` switched off it is addmm itself, bitwise."""
    from biaslens.locate.patching import _ACTS, fused_matmul

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 64, generator=g), torch.randn(64, 96, generator=g) / 8, torch.randn(96, generator=g)
    ref = torch.addmm(b, x, w)
    ref = ref if act is None else _ACTS[act](ref)
    wl = w if conv else w.t().contiguous()
    with torch.no_grad():
        got = fused_matmul(x, wl, b, conv, act)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        with torch.backends.mkldnn.flags(enabled=False):
            plain = fused_matmul(x, wl, b, conv, act)
            want = torch.addmm(b, x, w) if conv else torch.nn.functional.linear(x, wl, b)
            want = want if act is None else _ACTS[act](want)
    assert torch.equal(plain, want)


@pytest.mark.parametrize("k", [0, 5])
def test_fused_matmul_gradient_reaches_the_unfrozen_rows_only(k):
    """Through ``_lin`` with frozen weights, ``x`` gets autograd's gradient at rows ``k:`` and
    zeros at the ``k`` frozen rows before them."""
    from biaslens.locate.patching import _lin

    g = torch.Generator().manual_seed(1)
    x0, w, b = torch.randn(12, 16, generator=g), torch.randn(16, 8, generator=g), torch.randn(8, generator=g)
    gy = torch.randn(12, 8, generator=g)
    x = x0.clone().requires_grad_(True)
    (_lin(x, w, b, k, True, "gelu_tanh") * gy).sum().backward()
    ref = x0.clone().requires_grad_(True)
    (torch.nn.functional.gelu(torch.addmm(b, ref, w), approximate="tanh") * gy).sum().backward()
    assert torch.all(x.grad[:k] == 0)
    torch.testing.assert_close(x.grad[k:], ref.grad[k:], rtol=1e-5, atol=1e-5)
