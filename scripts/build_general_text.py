"""Write the package's general text from the shipped WikiText-2 test split.

``src/data/general/stats.txt`` (the first 60% of the articles) feeds the key statistics of the
weight edits; ``src/data/general/heldout.txt`` (the other 40%) is the perplexity text of the
default retention checks, so an edit is never scored on the text its statistics came from. One
paragraph a line; article and section headings dropped; WikiText's tokenisation kept as is.

    python scripts/build_general_text.py      # rewrites both files (deterministic)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "data"
SOURCE = ROOT / "wikitext-2-raw" / "wiki.test.raw"
SHARE = 0.6


def articles(text: str) -> list[list[str]]:
    """Paragraphs of each article (an article starts at a `` = Title = `` line)."""
    out: list[list[str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        s = line.strip()
        if re.fullmatch(r"= [^=].* =", s):
            out.append([])
        elif s and not s.startswith("="):
            if not out:
                out.append([])
            out[-1].append(s)
    return [a for a in out if a]


def main() -> None:
    arts = articles(SOURCE.read_text(encoding="utf-8"))
    k = round(SHARE * len(arts))
    for name, part in (("stats.txt", arts[:k]), ("heldout.txt", arts[k:])):
        lines = [p for a in part for p in a]
        (ROOT / "general" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{name}: {len(part)} articles, {len(lines)} paragraphs")


if __name__ == "__main__":
    main()
