"""Checked numbers for command-line flags: ``argparse`` ``type=`` functions.

Each returns the parsed value or raises :class:`argparse.ArgumentTypeError` with a message that
says what is allowed; argparse then names the flag (``argument --alpha: ...``) and the CLI exits
with code 2. No torch import.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["float_in", "int_in", "positive_int", "nonneg_int", "seed_int", "positive_float",
           "nonneg_float", "finite_float", "check", "layer_list", "size_bytes", "max_memory",
           "DEVICE_MAP_STRATEGIES", "device_map"]


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def _fmt(x: float) -> str:
    return f"{x:g}"


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in ``[lo, hi]`` (``None``: unbounded on that side; ``*_open``: strict)."""
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    span = f"{left}{'-inf' if lo is None else _fmt(lo)}, {'inf' if hi is None else _fmt(hi)}{right}"

    def parse(text: str) -> float:
        v = _float(text)
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, not {text!r}")
        return v

    return parse


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[lo, hi]`` (``None``: unbounded on that side)."""
    if hi is None:
        span = {None: "a whole number", 0: "a whole number >= 0", 1: "a positive integer"}.get(
            lo, f"a whole number >= {lo}")
    else:
        span = f"a whole number in [{lo}, {hi}]" if lo is not None else f"a whole number <= {hi}"

    def parse(text: str) -> int:
        v = _int(text)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {span}, not {text!r}")
        return v

    return parse


def finite_float(text: str) -> float:
    """Any finite float (not nan, inf)."""
    return _float(text)


positive_float = float_in(0.0, None, lo_open=True)
positive_float.__doc__ = "A finite float > 0."
nonneg_float = float_in(0.0, None)
nonneg_float.__doc__ = "A finite float >= 0."
positive_int = int_in(1)
positive_int.__doc__ = "A whole number >= 1."
nonneg_int = int_in(0)
nonneg_int.__doc__ = "A whole number >= 0."
#: a seed numpy, torch and random all accept
seed_int = int_in(0, 2**32 - 1)


def check(value, parse: Callable[[str], object], flag: str):
    """``parse(str(value))`` for a value set without the parser (e.g. a hand-built namespace);
    a bad value raises :class:`~biaslens.errors.BiasLensError` naming ``flag``."""
    if value is None:
        return None
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as exc:
        from biaslens.errors import BiasLensError

        raise BiasLensError(f"{flag}: {exc}") from None


def layer_list(text: str) -> str:
    """``auto`` or comma-separated layer indices (``0,2``); returned as given."""
    if text.strip() != "auto":
        parts = [x.strip() for x in text.split(",")]
        if not parts or not all(x.isdigit() for x in parts):
            raise argparse.ArgumentTypeError(f"must be 'auto' or comma-separated layer numbers like 1,2, "
                                              f"not {text!r}")
    return text


# ------------------------------------------------------------- model placement (accelerate)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(text: str) -> int:
    """A memory or file size: bytes (``1500000``) or a number with a unit (``2GiB``, ``500MB``,
    ``1.5GB``; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024, case-insensitive).
    Returns a positive whole number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"must be a size like 2GiB, 500MB or a number of bytes, not {text!r}")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a size above zero, not {text!r}")
    return value


def _memory_key(text: str) -> int | str:
    key = text.strip().lower()
    if key.isdigit():
        return int(key)
    if key.startswith("cuda:") and key[5:].isdigit():
        return int(key[5:])
    if key in ("cpu", "mps"):
        return key
    raise argparse.ArgumentTypeError(
        f"names a device {text.strip()!r} it does not know: use a GPU number (0, 1, ...), cuda:N, "
        "cpu or mps, e.g. 0=20GiB,cpu=60GiB")


def max_memory(text: str) -> dict[int | str, int] | int:
    """``--max-memory``: one size (``3GiB``: the budget of every GPU, or of the CPU on a machine
    without one) or ``DEVICE=SIZE`` pairs (``0=20GiB,1=20GiB,cpu=60GiB``). Returns the size in
    bytes, or a dict device -> bytes (GPU numbers as ints)."""
    text = str(text).strip()
    if "=" not in text:
        return size_bytes(text)
    out: dict[int | str, int] = {}
    for part in text.split(","):
        key, eq, size = part.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(
                f"must be one size (3GiB) or DEVICE=SIZE pairs like 0=20GiB,cpu=60GiB, not {text!r}")
        k = _memory_key(key)
        if k in out:
            raise argparse.ArgumentTypeError(f"names {key.strip()!r} twice in {text!r}")
        try:
            out[k] = size_bytes(size)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{key.strip()}: {exc}") from None
    return out


#: the placement strategies of accelerate's ``infer_auto_device_map`` that transformers accepts
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _map_device(text: str) -> int | str:
    v = text.strip().lower()
    if v.isdigit():
        return int(v)
    if v in ("cpu", "disk", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    if v == "cuda":
        return "cuda:0"
    raise argparse.ArgumentTypeError(
        f"names a device {text.strip()!r} it does not know: use a GPU number, cuda:N, cpu or disk")


def device_map(text: str) -> str | dict[str, int | str]:
    """``--device-map``: a strategy (auto, balanced, balanced_low_0, sequential), one device for the
    whole model (``disk``, ``cpu``, ``0``), or ``MODULE=DEVICE`` pairs
    (``model.embed_tokens=0,model.layers=disk,lm_head=0``; ``=DEVICE`` is the whole model)."""
    text = str(text).strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if "=" not in text:
        try:
            return {"": _map_device(text)}
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, disk, 0, cuda:1) "
                f"or MODULE=DEVICE pairs, not {text!r}") from None
    out: dict[str, int | str] = {}
    for part in text.split(","):
        module, eq, dev = part.partition("=")
        module = module.strip()
        if not eq:
            raise argparse.ArgumentTypeError(
                f"must be MODULE=DEVICE pairs like model.layers=disk,lm_head=cpu, not {text!r}")
        if module in out:
            raise argparse.ArgumentTypeError(f"names module {module!r} twice in {text!r}")
        try:
            out[module] = _map_device(dev)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{module or 'the whole model'}: {exc}") from None
    return out
