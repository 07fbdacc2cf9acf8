"""Self-contained HTML pages: plotly figures (plotly.js inlined once), tables and text.

Every HTML file biaslens writes goes through :meth:`Report.write` (the demo's ``report.html``, the
locate heatmaps through :func:`write_figures` / :func:`biaslens.locate.plots.write_html`, the evaluate and
compare charts): one standalone page that opens offline, written atomically
(:func:`biaslens.io.write_text`) and carrying biaslens's generator tag, so ``--force`` may replace
it later (:func:`biaslens.io.written_by_biaslens`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["Report", "raw", "write_figures"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;
color:#1d2330;line-height:1.45;padding:0 1rem}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #dde;
padding-bottom:.2rem}.sub{color:#667}table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #dde;padding:.3rem .6rem;text-align:right}th{background:#f3f5fa}
td:first-child,th:first-child{text-align:left}.good{color:#0a7d33}.bad{color:#b3261e}
code{background:#f3f5fa;padding:0 .25rem;border-radius:3px}.note{color:#556;font-size:.9rem}
"""


class Report:
    """Collects sections and writes one HTML file that needs no network to open."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self._parts: list[str] = []
        self._has_plotly = False

    def heading(self, text: str) -> None:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self._parts.append(f"<p{c}>{text}</p>")

    def table(self, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else html.escape(str(c))}</td>" for c in r) + "</tr>"
            for r in rows
        )
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig) -> None:
        include = "inline" if not self._has_plotly else False
        self._has_plotly = True
        self._parts.append(fig.to_html(full_html=False, include_plotlyjs=include,
                                       config={"displaylogo": False}))

    def page(self) -> str:
        """The whole page as text."""
        from biaslens.io import mark_html

        return mark_html(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
            f"<p class='sub'>{html.escape(self.subtitle)}</p>{''.join(self._parts)}</body></html>"
        )

    def write(self, path: str | Path) -> Path:
        """Write the page to ``path`` (a per-process temporary file, then ``os.replace``)."""
        from biaslens.io import write_text

        return write_text(Path(path), self.page())


class _Raw(str):
    """A table cell holding trusted HTML."""


def raw(s: str) -> _Raw:
    return _Raw(s)


def write_figures(figs: Any | Sequence[Any], path: str | Path, title: str = "biaslens",
                  subtitle: str = "") -> Path:
    """One standalone page holding plotly figure(s) ``figs`` (plotly.js inlined once), written to
    ``path`` (its folder is created)."""
    figs = [figs] if hasattr(figs, "to_html") else list(figs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rep = Report(title, subtitle)
    for fig in figs:
        rep.figure(fig)
    return rep.write(path)
