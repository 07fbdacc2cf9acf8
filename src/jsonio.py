"""Strict JSON for everything biaslens writes: reports, manifests, effect maps.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON; here non-finite numbers
become ``null`` (and a top-level ``"nonfinite"`` field names where and says why) and tensors,
numpy values and paths become numbers, lists or strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["clean", "MAX_LISTED", "dumps", "write"]


def clean(obj: Any, found: list[str] | None = None, where: str = "") -> Any:
    """``obj`` as strict JSON data: non-finite floats become ``None`` (their paths, such as
    ``after.perplexity.ci[1]``, appended to ``found``); tensors, numpy values and paths become
    numbers, lists or strings."""
    import math

    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if found is not None:
            found.append(f"{where or '.'} = {obj}")
        return None
    if isinstance(obj, dict):
        return {str(k): clean(v, found, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [clean(v, found, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy arrays and scalars
        try:
            return clean(obj.tolist(), found, where)
        except (TypeError, ValueError, RuntimeError):
            pass
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return clean(obj.item(), found, where)
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


#: at most this many non-finite paths are listed in ``"nonfinite"``
MAX_LISTED = 20


def dumps(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text (ending in a newline). A dict holding non-finite numbers gets a
    top-level ``"nonfinite"`` field: how many became ``null``, the first paths, and why."""
    found: list[str] = []
    data = clean(obj, found)
    if found and isinstance(data, dict) and "nonfinite" not in data:
        data["nonfinite"] = {"count": len(found), "paths": found[:MAX_LISTED],
                             "why": "NaN or infinite values, which JSON cannot hold, written as null"}
    return json.dumps(data, indent=indent, allow_nan=False) + "\n"


def write(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` to ``path`` as strict JSON."""
    path = Path(path)
    path.write_text(dumps(obj, indent), encoding="utf-8")
    return path
