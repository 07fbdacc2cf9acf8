"""The closed-form weight solves of the editing methods, and the factor they share.

- :func:`least_squares_update`: ΔW = R Kᵀ (λC + K Kᵀ + w K_keep K_keepᵀ)⁻¹ (MEMIT eq. 14, Meng et
  al. 2023, plus keep constraints), the solve of LSDM (docs/methods/lsdm.md);
- :func:`regularised_factor`: the Cholesky factor of λC + ridge·mean(diag λC)·I that
  :func:`least_squares_update` takes as ``factor`` and :mod:`biaslens.edit.covariance` caches;
- :func:`rank_one_update`: ΔW = r (C⁻¹k)ᵀ / (kᵀ C⁻¹ k) (ROME eq. 2, Meng et al. 2022), the
  rank-one baseline.

All in float64 with triangular or linear solves, never an explicit inverse. This module imports
nothing of biaslens but the errors, so the cache and the methods can both depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from biaslens.errors import BiasLensError

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

__all__ = ["least_squares_update", "regularised_factor", "rank_one_update"]


def least_squares_update(
    keys: "Float[torch.Tensor, 'n d_mlp']",
    resid: "Float[torch.Tensor, 'n d_model']",
    second_moment: "Float[torch.Tensor, 'd_mlp d_mlp'] | None",
    mom2_weight: float,
    keep_keys: "Float[torch.Tensor, 'm d_mlp'] | None" = None,
    keep_weight: float = 1.0,
    ridge: float = 0.0,
    factor: "Float[torch.Tensor, 'd_mlp d_mlp'] | None" = None,
) -> "Float[torch.Tensor, 'd_model d_mlp']":
    """ΔW = R Kᵀ (λC + K Kᵀ + w K_keep K_keepᵀ)⁻¹ in float64 (MEMIT eq. 14), with keys and
    residuals as rows. It minimises Σ‖ΔW k_i − r_i‖² + w Σ‖ΔW k_keep‖² + λ tr(ΔW C ΔWᵀ)
    (+ ``ridge``·mean(diag λC)·‖ΔW‖², a relative damping, when ``ridge`` > 0; relative to the
    whole system's diagonal when there is no C).

    ``factor``: the Cholesky factor of B = λC + ridge·mean(diag λC)·I (:func:`regularised_factor`,
    cached per key statistic). With fewer key columns (n + m) than the MLP width, the keys then
    enter through the Woodbury identity, with triangular solves on the n + m key columns only
    instead of a new d_mlp × d_mlp factorisation; the result is checked against the normal
    equations and recomputed directly if it falls short. With more columns the d_mlp × d_mlp
    system is the smaller one and is solved directly."""
    import torch

    K = keys.to(torch.float64)
    R = resid.to(torch.float64)
    U = K
    if keep_keys is not None and len(keep_keys) and keep_weight > 0:
        U = torch.cat([K, keep_weight**0.5 * keep_keys.to(device=K.device, dtype=torch.float64)])
    # Woodbury pays off only with fewer key columns than the MLP width (its inner system is
    # (n + m) × (n + m)); with more, the d_mlp × d_mlp normal equations are the smaller system
    if factor is not None and second_moment is not None and mom2_weight > 0 and len(U) < K.shape[1]:
        Y = _woodbury_solve(factor.to(device=K.device, dtype=torch.float64), U, len(K))
        if Y is not None:
            return (Y @ R).T.contiguous()
    A = U.T @ U
    if second_moment is not None and mom2_weight > 0:
        B = mom2_weight * second_moment.to(device=A.device, dtype=torch.float64)
        A = A + B
        scale = B.diagonal().mean()
    else:
        scale = A.diagonal().mean()
    if ridge > 0:  # relative Tikhonov damping: keeps A definite when the keys span too little
        A = A + ridge * scale * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)  # A is symmetric positive definite unless singular
    if int(info) != 0:
        raise BiasLensError(
            "the LSDM system is singular (not positive definite); use mom2_weight > 0 with a key "
            "statistic from general text, or fewer key columns than the MLP width"
        )
    # A⁻¹Kᵀ first (n right-hand sides, n = number of keys ≪ d_model), then times R: the same
    # X = A⁻¹ Kᵀ R [d_mlp, d_model] with far fewer triangular solves; no explicit inverse
    X = torch.cholesky_solve(K.T.contiguous(), L) @ R
    return X.T.contiguous()


def regularised_factor(second_moment: "torch.Tensor", mom2_weight: float, ridge: float) -> "torch.Tensor":
    """Lower Cholesky factor of B = λC + ridge·mean(diag λC)·I (float64), for :func:`least_squares_update`."""
    import torch

    B = mom2_weight * second_moment.to(torch.float64)
    if ridge > 0:
        B = B + ridge * B.diagonal().mean() * torch.eye(B.shape[0], dtype=B.dtype, device=B.device)
    L, info = torch.linalg.cholesky_ex(B)
    if int(info) != 0:
        raise BiasLensError("the key statistic is singular: use ridge > 0 or more general text (cov_tokens)")
    return L


def _woodbury_solve(L: "torch.Tensor", U: "torch.Tensor", n: int) -> "torch.Tensor | None":
    """Y = (B + UᵀU)⁻¹ K ᵀ with B = L Lᵀ and K = U[:n] (Woodbury):
    Z = B⁻¹Uᵀ, S = I + U Z, Y = Z_K − Z S⁻¹ (U Z_K). None if the normal equations
    (B + UᵀU) Y = Kᵀ are not met to 1e-8 (relative), e.g. when UᵀU dwarfs B."""
    import torch

    Z = torch.cholesky_solve(U.T.contiguous(), L)  # [d, n + m]
    S = U @ Z
    S.diagonal().add_(1.0)
    Ls, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        return None
    Y = Z[:, :n] - Z @ torch.cholesky_solve(S[:, :n] - torch.eye(S.shape[0], n, dtype=S.dtype, device=S.device), Ls)
    # the normal equations on a few random combinations of the columns (matrix-vector products)
    v = torch.randn(n, 4, dtype=Y.dtype, device=Y.device, generator=torch.Generator(device=Y.device).manual_seed(0))
    y = Y @ v
    check = L @ (L.T @ y) + U.T @ (U @ y) - U[:n].T @ v
    if not bool(check.norm() <= 1e-8 * (U[:n].T @ v).norm()):
        return None
    return Y


# ---------------------------------------------------------------------------------------- ROME
def rank_one_update(key: "torch.Tensor", resid: "torch.Tensor", second_moment: "torch.Tensor",
                    ridge: float = 1e-6) -> "torch.Tensor":
    """ΔW = r (C⁻¹k)ᵀ / (kᵀ C⁻¹ k) in float64 (ROME eq. 2): maps k to W k + r, minimal in C
    (C damped by ``ridge``·mean(diag C)·I so it stays invertible)."""
    import torch

    k = key.to(torch.float64)
    C = second_moment.to(torch.float64)
    C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    c_inv_k = torch.linalg.solve(C, k)
    return torch.outer(resid.to(torch.float64), c_inv_k) / (k @ c_inv_k)
