"""biaslens.edit: remove a located bias from the MLP weights (LSDM) and the baselines.

``lsdm(model, ...)`` (Cai et al. 2024; docs/methods/lsdm.md), ``counterfactual_finetune(model, layers)``,
``rome_rank_one(model, layer)``, ``key_covariance(model, layer, corpus_path)``, and the projection
peers ``dama(model, ...)`` (Limisiewicz et al. 2024; :mod:`biaslens.edit.projection`) and
``leace(model, ...)`` (Belrose et al. 2023; :mod:`biaslens.edit.erasure`). Each edit leaves the model
edited and returns a reversible :class:`~biaslens.delta.WeightDelta`.

Imports are eager and explicit; the modules import torch only inside functions, so importing this
package does not import torch.
"""

from __future__ import annotations

from biaslens.edit.baselines import counterfactual_finetune, rome_rank_one
from biaslens.edit.covariance import key_covariance, key_covariances
from biaslens.edit.erasure import LEACEHparams, leace
from biaslens.edit.hparams import CDAHparams, LSDMHparams, ROMEHparams
from biaslens.edit.least_squares import lsdm
from biaslens.edit.projection import DAMAHparams, dama
from biaslens.edit.solve import least_squares_update

__all__ = ["lsdm", "counterfactual_finetune", "rome_rank_one", "key_covariance",
           "key_covariances", "LSDMHparams", "ROMEHparams", "CDAHparams", "least_squares_update",
           "dama", "DAMAHparams", "leace", "LEACEHparams"]
