"""Baselines run through the same interface as LSDM (Cai et al. 2024 compare against both).

* :func:`counterfactual_finetune`: counterfactual data augmentation (Zmigrod et al. 2019) — each
  occupation sentence with both pronouns (the original and its gender swap), each definitional
  sentence with its own pronoun (its swap is the partner word's sentence), and a language-model
  fine-tune of only the MLP output weights of the same layers LSDM edits.
* :func:`rome_rank_one`: ROME's single-layer rank-one update (Meng et al. 2022, eq. 2) with one key
  k* (the mean key of all edit prompts) and one target v* = W k* + δ, δ optimised as in LSDM:
  ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*).
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.edit.hparams import CDAHparams, ROMEHparams
from biaslens.edit.keys import check_role, gather, site_batch
from biaslens.edit.common import as_hparams, default_keep_prompts, default_prompts, guarded_edit, resolve_corpus
from biaslens.edit.site import resolve_site
from biaslens.edit.solve import rank_one_update
from biaslens.errors import BiasLensError
from biaslens.hooks import act_name
from biaslens.metrics import pronoun_pair
from biaslens.prompts import female_rate

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    import torch

    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel

__all__ = ["counterfactual_texts", "counterfactual_finetune", "rome_rank_one"]


# ---------------------------------------------------------------------------------------- CDA
def counterfactual_texts(prompts: Sequence[Any], keep_prompts: Sequence[Any] = ()) -> list[str]:
    """Occupation prompts completed with both pronouns; definitional prompts with their own."""
    texts = []
    for p in prompts:
        male, female = pronoun_pair(p)
        texts += [p.text + male, p.text + female]
    for p in keep_prompts:
        male, female = pronoun_pair(p)
        rate = female_rate(p)
        if rate != rate:  # NaN: the prompt has no rate
            raise BiasLensError("keep prompts need a female_rate of 0 or 1 (male or female word)")
        texts.append(p.text + (female if rate >= 0.5 else male))
    return texts


def counterfactual_finetune(
    model: "BiasModel",
    layers: Sequence[int] | str = "auto",
    prompts: Sequence[Any] | None = None,
    keep_prompts: Sequence[Any] | None = None,
    hparams: CDAHparams | dict | str | os.PathLike | None = None,
    effect_map: "EffectMap | str | os.PathLike | None" = None,
    progress: bool = True,
) -> "WeightDelta":
    """Fine-tune the MLP output weights of ``layers`` on counterfactually augmented sentences
    (language-model loss over every token, AdamW); the model is left edited."""
    import torch
    from tqdm.auto import tqdm

    hp = as_hparams(hparams, CDAHparams)
    model.require_whole("counterfactual fine-tuning")  # trains Parameters in place
    prompts = default_prompts(model) if prompts is None else list(prompts)
    keep = default_keep_prompts(model) if keep_prompts is None else list(keep_prompts)
    site = resolve_site(model, prompts, layers, "last" if layers != "auto" else "auto", effect_map)
    layers = site["layers"]
    names = [model.mlp_out_name(l) for l in layers]
    texts = counterfactual_texts(prompts, keep)
    t0 = time.perf_counter()

    def run():
        params = [model.param(n) for n in names]
        frozen = [p for p in model.params.values() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        rng = random.Random(hp.seed)
        losses = []
        try:
            steps = hp.epochs * ((len(texts) + hp.batch_size - 1) // hp.batch_size)
            bar = tqdm(total=steps, desc="counterfactual fine-tune", disable=not progress,
                       file=sys.stderr, leave=False)
            for _ in range(hp.epochs):
                order = list(range(len(texts)))
                rng.shuffle(order)
                for s in range(0, len(order), hp.batch_size):
                    b = model.encode([texts[i] for i in order[s : s + hp.batch_size]])
                    logits = model.forward(b)
                    lp = torch.log_softmax(logits[:, :-1].float(), -1)
                    tok = lp.gather(2, b.input_ids[:, 1:, None])[..., 0]
                    mask = b.attention_mask[:, 1:].float()
                    loss = -(tok * mask).sum() / mask.sum()
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                    opt.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
        finally:
            for p in params:
                p.requires_grad_(False)
            for p in frozen:
                p.requires_grad_(True)
        return losses

    snap, losses = guarded_edit(model, names, run)
    info = {"site": {"layers": layers, "role": None, "source": site["source"]},
            "effect_map": site["effect_map"],
            "diagnostics": {"n_texts": len(texts), "steps": len(losses),
                            "first_loss": losses[0] if losses else None,
                            "final_loss": losses[-1] if losses else None},
            "seconds": round(time.perf_counter() - t0, 2)}
    return model.delta_since(snap, method="cda", hparams=hp.to_dict(), info=info)


# ---------------------------------------------------------------------------------------- ROME
def rome_rank_one(
    model: "BiasModel",
    layer: int | str = "auto",
    prompts: Sequence[Any] | None = None,
    role: str = "auto",
    corpus: str | os.PathLike | None = None,
    hparams: ROMEHparams | dict | str | os.PathLike | None = None,
    effect_map: "EffectMap | str | os.PathLike | None" = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> "WeightDelta":
    """One rank-one update of the MLP output weight at ``layer`` (the model is left edited)."""
    import torch

    from biaslens.edit.covariance import key_covariance
    from biaslens.edit.targets import compute_targets

    hp = as_hparams(hparams, ROMEHparams)
    prompts = default_prompts(model) if prompts is None else list(prompts)
    layers = [int(layer)] if not isinstance(layer, str) or layer != "auto" else "auto"
    site_info = resolve_site(model, prompts, layers, role, effect_map)
    layer, role = site_info["layers"][-1], check_role(site_info["role"])
    C = key_covariance(model, layer, resolve_corpus(model, corpus), hp.cov_tokens, hp.cov_seq_len,
                       hp.cov_batch_size, cache_dir, progress=progress)
    name = model.mlp_out_name(layer)
    t0 = time.perf_counter()

    def run():
        site = site_batch(model, prompts, role, "none")
        k_star = gather(model, site, [act_name("mlp_key", layer)], hp.batch_size)[
            act_name("mlp_key", layer)].float().mean(0)
        z, tinfo = compute_targets(model, site, layer, hp, shared=True, progress=progress)
        h = gather(model, site, [act_name("resid_post", layer)], hp.batch_size)[
            act_name("resid_post", layer)].float().mean(0)
        r = z[0] - h  # the shared δ
        dW = rank_one_update(k_star, r, C, hp.ridge)
        W = model.mlp_out_matrix(layer)
        with torch.no_grad():
            W.add_(dW.to(device=W.device, dtype=W.dtype))
        return {"targets": tinfo, "update_norm": float(dW.norm()),
                "relative_update": float(dW.norm() / W.double().norm())}

    snap, diag = guarded_edit(model, [name], run)
    info = {"site": {"layers": [layer], "role": role, "source": site_info["source"]},
            "effect_map": site_info["effect_map"], "diagnostics": diag,
            "seconds": round(time.perf_counter() - t0, 2)}
    return model.delta_since(snap, method="rome", hparams=hp.to_dict(), info=info)
