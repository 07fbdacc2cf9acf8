"""Files shipped with biaslens: the default prompt bank, general text and public benchmarks.

Their provenance and licences are in ``README.md`` beside this module. Nothing here imports torch.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

__all__ = ["ROOT", "BANK", "STATS_TEXT", "HELDOUT_TEXT", "OCCUPATION_STATS", "GPT2_BPE", "path",
           "bank"]

ROOT: Path = Path(__file__).resolve().parent
BANK: Path = ROOT / "bank.json"
#: Key statistics text (first 60% of the WikiText-2 test articles, one paragraph a line).
STATS_TEXT: Path = ROOT / "general" / "stats.txt"
#: Perplexity text of the default retention checks (the other 40%).
HELDOUT_TEXT: Path = ROOT / "general" / "heldout.txt"
OCCUPATION_STATS: Path = ROOT / "winogender" / "occupations-stats.tsv"
GPT2_BPE: Path = ROOT / "gpt2-bpe"


def path(relative: str) -> Path:
    """A shipped file or folder by its path under :data:`ROOT` (raises if it is not there)."""
    p = ROOT / relative
    if not p.exists():
        raise FileNotFoundError(f"biaslens data file '{relative}' is missing from the installed package")
    return p


@lru_cache(maxsize=1)
def _bank_text() -> str:
    return BANK.read_text(encoding="utf-8")


def bank() -> dict:
    """The parsed prompt bank (a fresh copy on every call)."""
    return json.loads(_bank_text())
