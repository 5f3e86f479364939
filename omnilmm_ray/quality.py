"""Caption quality flags: cheap checks on a caption's text, its finish reason and its prompt.

Pure functions (no Ray, no engine), run in the engine actor right after each engine call so the retry policy
(`quality.retry_flags`) can act on them. A flag says "look at this row", not "this row failed": flagged rows
keep their caption and count toward the error budget only when `quality.error_budget_flags` names them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import lru_cache

import pyarrow as pa

from omnilmm_ray.config import QualityConfig


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the text's n-grams that repeat an earlier one: 0 for varied text, near 1 for a loop.

    Words are the tokens; text with too few words to judge (a run of one character, a script written without
    spaces) is judged by its characters instead.
    """
    tokens: list[str] = text.lower().split()
    if len(tokens) < 2 * n:
        tokens = [c for c in text.lower() if not c.isspace()]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def script_of(ch: str) -> str | None:
    """The Unicode script of a letter, from its character name ('LATIN', 'CYRILLIC', 'CJK', ...)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else None


def foreign_letter_share(text: str, expected: frozenset[str]) -> float:
    scripts = [s for s in map(script_of, text) if s is not None]
    if not scripts:
        return 0.0
    return sum(1 for s in scripts if s not in expected) / len(scripts)


@lru_cache(maxsize=64)
def _refusal_re(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def _echoes(text: str, prompt: str | None) -> bool:
    """The caption starts with the instruction itself (models sometimes repeat it before answering)."""
    if not prompt or len(prompt) < 16:
        return False
    squash = " ".join(prompt.lower().split())
    return " ".join(text.lower().split()).startswith(squash)


def caption_flags(
    text: str | None, finish_reason: str | None, prompt: str | None, cfg: QualityConfig, name: str = ""
) -> list[str]:
    """The flags of one caption, in FLAGS order. `name`: the prompt's name in multi-prompt mode, which picks
    its `quality.min_chars` entry."""
    text = text or ""
    if not text.strip():
        return ["empty"] + (["truncated"] if finish_reason == "length" else [])
    out = []
    if finish_reason == "length":
        out.append("truncated")
    if repeated_ngram_share(text, cfg.repetition_ngram) > cfg.repetition_threshold:
        out.append("repetition")
    pattern = _refusal_re(tuple(cfg.refusal_patterns))
    if (pattern is not None and pattern.search(text)) or _echoes(text, prompt):
        out.append("refusal")
    if len(text.strip()) < cfg.min_chars_for(name):
        out.append("too_short")
    if cfg.expected_scripts and foreign_letter_share(
        text, frozenset(s.upper() for s in cfg.expected_scripts)
    ) > (cfg.script_threshold):
        out.append("unexpected_script")
    return out


def base_flag(flag: str) -> str:
    """'alt:too_short' (multi-prompt mode) -> 'too_short'."""
    return flag.rpartition(":")[2]


def count_flags(rows: pa.Table, cfg: QualityConfig) -> Counter:
    """One shard file's quality counters, to be added up over a run (commit.RunCounts): `flagged_rows`,
    `retried` (captions captioned again under `retry_flags`), `mended_by_retry` (of those, the ones the retry
    cleared of every retry flag), `counted_as_errors` (ok rows whose flags `error_budget_flags` names), and
    `flag:<name>` rows per flag."""
    n = len(rows)
    flags = rows.column("flags").to_pylist() if "flags" in rows.column_names else [None] * n
    c: Counter = Counter(f"flag:{f}" for fl in flags for f in set(fl or ()))
    c["flagged_rows"] += sum(1 for f in flags if f)
    for first_col in (col for col in rows.column_names if col.startswith("first_flags")):
        final = rows.column(first_col.removeprefix("first_")).to_pylist()
        for first, last in zip(rows.column(first_col).to_pylist(), final):
            if first is not None:
                c["retried"] += 1
                c["mended_by_retry"] += not set(cfg.retry_flags).intersection(last or [])
    budget = set(cfg.error_budget_flags)
    kinds = rows.column("error_kind").to_pylist()
    c["counted_as_errors"] += sum(
        1 for f, k in zip(flags, kinds) if k is None and budget.intersection(map(base_flag, f or []))
    )
    return c


def quality_summary(c: Counter) -> dict:
    """The summary's `quality` section from a run's added-up `count_flags` counters."""
    by_flag = {k.removeprefix("flag:"): v for k, v in c.items() if k.startswith("flag:")}
    return {
        "flagged_rows": c["flagged_rows"],
        "by_flag": dict(sorted(by_flag.items(), key=lambda kv: (-kv[1], kv[0]))),
        "retried": c["retried"],
        "mended_by_retry": c["mended_by_retry"],
        "counted_as_errors": c["counted_as_errors"],
    }
