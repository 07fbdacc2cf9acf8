"""Checked numbers for command-line flags: ``argparse`` ``type=`` functions.

Each returns the parsed value or raises :class:`argparse.ArgumentTypeError` with a message that
says what is allowed; argparse then names the flag (``argument --alpha: ...``) and the CLI exits
with code 2. No torch import.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


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
