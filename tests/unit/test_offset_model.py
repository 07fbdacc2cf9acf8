"""An offset pair holds three models and is none of them (biaslens.unlearn.offset.OffsetModel):
it scores with the combined logits, and what only one model has (weights, hooks, a residual
stream) is refused with a clear error, by the object and by locate, lsdm and PCGU."""

from __future__ import annotations

import pytest
import torch

import biaslens
from biaslens.errors import BiasLensError
from biaslens.model import BiasModel
from biaslens.prompts import Prompt

pytestmark = pytest.mark.usefixtures("one_thread")

VAL = [Prompt("The nurse said that", "nurse"), Prompt("The engineer said that", "engineer")]


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    from biaslens.unlearn.offset import OffsetModel

    large = biaslens.load(tiny_dirs["gpt2"])
    base, off = biaslens.load(tiny_dirs["gpt2"]), biaslens.load(tiny_dirs["gpt2"])
    with torch.no_grad():
        off.param("transformer.ln_f.weight").mul_(5.0)  # a large change of the logits
    return OffsetModel(large, base, off, alpha=1.5)


def test_it_holds_three_models_and_is_none_of_them(pair):
    assert not isinstance(pair, BiasModel)
    assert pair.large is not pair.base and pair.offset is not pair.base
    assert pair.spec.startswith("offset(") and pair.path == pair.large.path
    assert pair.tokenizer is pair.large.tokenizer and pair.device == pair.large.device
    assert pair.max_positions == min(m.max_positions for m in (pair.large, pair.base, pair.offset))
    for name in ("bridge", "params", "hf", "arch", "n_layers", "weight_hash", "snapshot"):
        assert not hasattr(pair, name)
        with pytest.raises(BiasLensError, match=f"an offset model has no '{name}'.*om.large"):
            getattr(pair, name)


def test_scoring_uses_the_combined_logits(pair):
    b = pair.encode(VAL)
    with torch.no_grad():
        want = pair.large.forward(b) + 1.5 * (pair.offset.forward(b) - pair.base.forward(b))
        assert torch.allclose(pair.forward(b), want, atol=1e-4)
        lp = pair.target_logprobs(b, [" he", " she"])
        last = want[torch.arange(len(b)), b.lengths - 1].log_softmax(-1)
        he, she = pair.word_ids(" he", VAL[0].text)[0], pair.word_ids(" she", VAL[0].text)[0]
        assert torch.allclose(lp, last[:, [he, she]], atol=1e-4)
        assert not torch.allclose(lp, pair.large.target_logprobs(b, [" he", " she"]), atol=1e-4)


def test_methods_that_need_one_model_refuse_it(pair):
    from biaslens.edit import lsdm
    from biaslens.locate import locate
    from biaslens.locate.noise import trace_noise
    from biaslens.unlearn import ContrastPair, pcgu

    before = [m.weight_hash() for m in (pair.large, pair.base, pair.offset)]
    with pytest.raises(BiasLensError, match="locating needs one model's weights"):
        locate(pair, VAL)
    with pytest.raises(BiasLensError, match="tracing needs one model's weights"):
        trace_noise(pair, VAL)
    with pytest.raises(BiasLensError, match="LSDM needs one model's weights"):
        lsdm(pair)
    with pytest.raises(BiasLensError, match="PCGU needs one model's weights"):
        pcgu(pair, [ContrastPair("He is strong.", "She is strong.")], validation=None, progress=False)
    assert [m.weight_hash() for m in (pair.large, pair.base, pair.offset)] == before
