"""biaslens.edit: remove a located bias from the MLP weights (LSDM) and the baselines.

``lsdm(model, ...)`` (Cai et al. 2024; docs/methods/lsdm.md), ``counterfactual_finetune(model, layers)``,
``rome_rank_one(model, layer)``, ``key_covariance(model, layer, corpus_path)``, and the projection
peers ``dama(model, ...)`` (Limisiewicz et al. 2024) and ``leace(model, ...)`` (Belrose et al. 2023). Each edit
leaves the model edited and returns a reversible :class:`~biaslens.delta.WeightDelta`.
Importing this package does not import torch.
"""

from __future__ import annotations

from biaslens._lazy import lazy_getattr

__all__ = ["lsdm", "counterfactual_finetune", "rome_rank_one", "key_covariance",
           "key_covariances", "LSDMHparams", "ROMEHparams", "CDAHparams", "least_squares_update",
           "dama", "DAMAHparams", "leace", "LEACEHparams"]

_WHERE = {
    "lsdm": "biaslens.edit.least_squares",
    "least_squares_update": "biaslens.edit.solve",
    "counterfactual_finetune": "biaslens.edit.baselines",
    "rome_rank_one": "biaslens.edit.baselines",
    "key_covariance": "biaslens.edit.covariance",
    "key_covariances": "biaslens.edit.covariance",
    "LSDMHparams": "biaslens.edit.hparams",
    "ROMEHparams": "biaslens.edit.hparams",
    "CDAHparams": "biaslens.edit.hparams",
    "dama": "biaslens.edit.dama",
    "DAMAHparams": "biaslens.edit.dama",
    "leace": "biaslens.edit.leace",
    "LEACEHparams": "biaslens.edit.leace",
}


__getattr__ = lazy_getattr(__name__, _WHERE)
