"""biaslens: locate where a language model stores a social bias, and remove it there.

Heavy dependencies (torch, TransformerLens) are imported lazily, so ``import biaslens`` and
``biaslens --help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(spec: str, device: str = "cpu", dtype: str = "float32", **kwargs):
    """Load a model as a :class:`biaslens.model.BiasModel`.

    ``spec`` is ``"organism"`` or ``"organism-llama"`` (the embedded planted-bias models, GPT-2
    and LLaMA), a local Hugging Face folder, or a hub name such as ``"gpt2"``. See
    :func:`biaslens.model.load`.
    """
    from biaslens.model import load as _load

    return _load(spec, device=device, dtype=dtype, **kwargs)
