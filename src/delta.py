"""A reversible weight change: which tensors an edit or unlearning method changed, and by how much.

Every method returns a :class:`WeightDelta`. ``undo`` restores the exact original weights (the
originals are kept, not recomputed from the difference), ``apply`` puts the change back; both
write through :meth:`~biaslens.model.BiasModel.restore`, which reaches weights accelerate
offloaded to CPU or disk (docs/offload.md), and read the tensors back to check every bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from biaslens.model import BiasModel

__all__ = ["WeightDelta", "load_delta"]


@dataclass
class WeightDelta:
    """``original[name]`` and ``updated[name]`` for each changed tensor, plus what made the change."""

    original: dict[str, "torch.Tensor"]
    updated: dict[str, "torch.Tensor"]
    method: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, model: "BiasModel", snapshot: dict[str, "torch.Tensor"], method: str = "",
                      hparams: dict | None = None, info: dict | None = None) -> "WeightDelta":
        import torch

        original, updated = {}, {}
        for n, before in snapshot.items():
            now = model.param(n).detach()
            if not torch.equal(before, now):
                original[n] = before.clone()
                updated[n] = now.clone()
        return cls(original, updated, method, dict(hparams or {}), dict(info or {}))

    @property
    def names(self) -> list[str]:
        return sorted(self.original)

    def diff(self, name: str) -> "torch.Tensor":
        return self.updated[name].float() - self.original[name].float()

    def tensors(self) -> dict[str, "torch.Tensor"]:
        """The differences ``updated - original`` (float32), by parameter name."""
        return {n: self.diff(n).contiguous() for n in self.names}

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for n in self.names:
            d, o = self.diff(n), self.original[n].float()
            out.append({
                "name": n,
                "shape": list(d.shape),
                "l2": float(d.norm()),
                "relative_l2": float(d.norm() / o.norm().clamp(min=1e-12)),
                "max_abs": float(d.abs().max()),
                "changed_entries": int((d != 0).sum()),
            })
        return out

    def changed_since(self, model: "BiasModel") -> list[str]:
        """Names of this delta's tensors that hold, bit for bit, neither the edited values it
        recorded nor its originals (another change came after it)."""
        return [n for n in self.names
                if not _same_bits(now := model.param(n).detach(), self.updated[n])
                and not _same_bits(now, self.original[n])]

    def undo(self, model: "BiasModel", force: bool = False) -> None:
        """Restore the original weights (a no-op when already undone). Refused
        (:class:`~biaslens.errors.BiasLensError`) when a tensor holds neither this delta's edited
        values nor its originals, e.g. stacked edits undone out of order: undo the last edit
        first, or pass ``force=True`` to restore the originals anyway."""
        if not force:
            moved = self.changed_since(model)
            if moved:
                from biaslens.errors import BiasLensError

                shown = ", ".join(moved[:4]) + (f" ... ({len(moved)} in all)" if len(moved) > 4 else "")
                raise BiasLensError(
                    f"cannot undo this {self.method or 'weight'} delta: {shown} changed after it "
                    "(a later edit or training step); undo the later edits first (last edit "
                    "first), or pass force=True to restore its originals anyway")
        _write_checked(model, self.original, f"undo this {self.method or 'weight'} delta")

    def apply(self, model: "BiasModel") -> None:
        """Put the change back (the recorded edited values, bit for bit)."""
        _write_checked(model, self.updated, f"apply this {self.method or 'weight'} delta")

    def is_finite(self) -> bool:
        import torch

        return all(torch.isfinite(t).all() for t in self.updated.values())

    def manifest(self) -> dict[str, Any]:
        return {"method": self.method, "hyperparameters": self.hparams,
                "changed_tensors": self.stats(), **self.info}

    def save(self, path: str | Path) -> None:
        """Write the differences as safetensors, with the method and hyperparameters as metadata."""
        from safetensors.torch import save_file

        meta = {"method": self.method, "hparams": json.dumps(self.hparams, default=str)}
        save_file(self.tensors(), str(path), metadata=meta)

    def __repr__(self) -> str:
        return f"WeightDelta(method={self.method!r}, tensors={len(self.names)})"


def _write_checked(model: "BiasModel", tensors: dict[str, "torch.Tensor"], what: str) -> None:
    """``model.restore(tensors)``, then read each weight back: a tensor that does not hold exactly
    the written bits raises :class:`~biaslens.errors.BiasLensError`."""
    model.restore(tensors)
    wrong = [n for n, t in tensors.items() if not _same_bits(model.param(n).detach(), t)]
    if wrong:
        from biaslens.errors import BiasLensError

        raise BiasLensError(f"could not {what}: {', '.join(wrong[:4])} did not take the written "
                            "values; the model's weights are not where biaslens can write them")


def _same_bits(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    """Bitwise equality (NaN equals the same NaN; -0.0 differs from 0.0)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                           b.contiguous().reshape(-1).view(torch.uint8))
    return torch.equal(a, b)


def load_delta(path: str | Path) -> dict[str, "torch.Tensor"]:
    """Read a ``delta.safetensors`` written by :meth:`WeightDelta.save` (no pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path))
