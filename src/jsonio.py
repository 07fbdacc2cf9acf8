"""Strict JSON for everything biaslens writes: reports, manifests, effect maps.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON; here non-finite numbers
become ``null`` and tensors, numpy values and paths become numbers, lists or strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def clean(obj: Any) -> Any:
    """``obj`` as strict JSON data: non-finite floats become ``None``; tensors, numpy values and
    paths become numbers, lists or strings."""
    import math

    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy arrays and scalars
        try:
            return clean(obj.tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return clean(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def dumps(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text (ending in a newline)."""
    return json.dumps(clean(obj), indent=indent, allow_nan=False) + "\n"


def write(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` to ``path`` as strict JSON."""
    path = Path(path)
    path.write_text(dumps(obj, indent), encoding="utf-8")
    return path
