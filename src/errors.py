"""Errors a user can act on. The CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

__all__ = ["BiasLensError", "ModelLoadError", "VocabularyError", "DataFormatError", "ExportError"]


class BiasLensError(Exception):
    """Bad input: the message says what was wrong and what to do."""


class ModelLoadError(BiasLensError):
    """A model spec that cannot be loaded (missing folder, unknown name, offline hub)."""


class VocabularyError(BiasLensError):
    """A word the tokenizer cannot represent the way the caller asked."""


class DataFormatError(BiasLensError):
    """A malformed data file; the message names the file and the line."""


class ExportError(BiasLensError):
    """An export that was refused (folder exists, non-finite weights, round trip mismatch)."""
