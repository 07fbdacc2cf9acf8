"""Where the organism carries its planted occupation → pronoun bias, by noise tracing.

Cai et al. (2024) find the bias in bottom MLPs at the last token of the occupation and in top
attention at the final token. The organism (4 layers, trained on synthetic text) shows a
different, shallower route, asserted here as it is:

- the residual stream at the subject tokens carries the bias at layer 0 (restoring it restores
  ~all of the total effect), and at the last token from layer 1 on;
- attention at layer 0, at the last token, moves it there (the largest attention site);
- the MLP that matters is layer 0's *after* the subject (the tokens after it and the last token),
  not at the subject's last token, where every layer's MLP restores ~nothing.

``scripts/locate_organism.py`` writes the full maps (more prompts and samples) to
``docs/results/locate_organism.md``.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def organism_map():
    from biaslens.organism import CHECKPOINT_DIR

    if not (CHECKPOINT_DIR / "config.json").exists():
        pytest.skip("the organism checkpoint is not in the repo yet")
    import biaslens
    from biaslens import organism
    from biaslens.defaults import balanced_sample
    from biaslens.locate.noise import trace_noise

    model = biaslens.load("organism")
    # the organism's own training prompts (what the asserted route was found on); the package's
    # default edit prompts now come from a template bank in the organism's vocabulary instead
    prompts = balanced_sample(organism.occupation_prompts("train", "train"), 16, seed=0)
    return trace_noise(model, prompts, n_samples=3, seed=0, progress=False, n_boot=200)


def _col(em, component, role):
    return em.effects[component][:, em.roles.index(role)]


def test_corruption_removes_the_bias(organism_map):
    assert organism_map.meta["te"] > 0.2  # noise on the occupation removes most of the lean


def test_residual_carries_the_bias_from_the_subject_to_the_last_token(organism_map):
    em = organism_map
    assert max(_col(em, "resid", "subject_first")[0], _col(em, "resid", "subject_last")[0]) > 0.6
    assert _col(em, "resid", "last")[-1] > 0.6
    assert abs(_col(em, "resid", "subject_last")[-1]) < 0.1  # nothing left at the subject at the top


def test_attention_at_the_last_token_moves_it(organism_map):
    top = organism_map.top_sites(1, component="attn")[0]
    assert (top.layer, top.role) == (0, "last") and top.effect > 0.4


def test_mlp_effect_is_after_the_subject_not_at_its_last_token(organism_map):
    em = organism_map
    at_subject = np.abs(np.concatenate([_col(em, "mlp", "subject_first"), _col(em, "mlp", "subject_last")]))
    assert at_subject.max() < 0.05  # unlike Cai et al.: no MLP effect at the occupation's tokens
    after = max(_col(em, "mlp", "after_subject")[0], _col(em, "mlp", "last")[0])
    assert after > 0.3
    assert em.best_layers("mlp", k=1) == [0]
    assert em.best_role("mlp") in ("after_subject", "last")
