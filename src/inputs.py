"""Reading a user's text files: a missing, oversized or non-UTF-8 file is one clear line."""

from __future__ import annotations

from pathlib import Path

from biaslens.errors import DataFormatError

__all__ = ["read_text"]


def read_text(path: str | Path, what: str, max_bytes: int | None = None, hint: str = "") -> str:
    """The UTF-8 text of ``path`` (``what`` names it in errors, e.g. "prompts file"); a file
    larger than ``max_bytes`` is refused unread (``hint`` says what to do instead)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{what} '{path}' does not exist")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise DataFormatError(f"{what} '{path}' is {size / 1e6:.0f} MB (at most "
                              f"{max_bytes // 10**6} MB){': ' + hint if hint else ''}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{what} '{path}' is not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start}); save it as UTF-8") from None
