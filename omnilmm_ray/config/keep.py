"""The config sections of what a run keeps: `quality` (caption flags and retries), `sink` (the output
table, its lease, error budget and retries) and `report` (progress and metrics)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
)

from omnilmm_ray.config.base import SecretOptions, _Strict
from omnilmm_ray.config.data import GenerationConfig
from omnilmm_ray.schema import ERROR_KINDS, FLAGS, RETRYABLE_KINDS

DEFAULT_REFUSALS = [
    r"\bI'?m sorry\b",
    r"\bI am sorry\b",
    r"\bas an AI\b",
    r"\bI (?:cannot|can't|can not|am unable to|'m unable to)\b",
    r"\bunable to (?:see|view|determine|identify) (?:the|this|any) image\b",
]


class QualityConfig(_Strict):
    repetition_ngram: int = Field(3, ge=1, description="n of the n-grams the repetition check counts.")
    repetition_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Flag `repetition` when more than this share of a caption's n-grams repeat an earlier one "
        "('a cat a cat a cat': 0.5).",
    )
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSALS),
        description="Regular expressions (case-insensitive) that flag `refusal`; a caption that starts with "
        "its own prompt is flagged too. [] turns the patterns off.",
    )
    min_chars: int | dict[str, int] = Field(
        10,
        description="Flag `too_short` below this many characters: one number, or per prompt name in "
        "multi-prompt mode (`{alt: 10, tags: 3}`; names not listed use 10).",
    )
    expected_scripts: list[str] = Field(
        ["latin"],
        description="Unicode scripts captions should be written in (first word of a letter's Unicode name: "
        "latin, cyrillic, greek, cjk, hiragana, arabic, ...). [] turns the check off.",
    )
    script_threshold: float = Field(
        0.2, ge=0, le=1, description="Flag `unexpected_script` above this share of letters in other scripts."
    )
    retry_flags: list[str] = Field(
        [],
        description="Caption rows with any of these flags once more with `retry_generation`; the row keeps "
        "the second attempt, and the first one in `first_caption` / `first_flags`.",
    )
    retry_generation: dict[str, Any] = Field(
        default_factory=lambda: {"repetition_penalty": 1.2, "max_new_tokens": 192},
        description="Generation settings changed for the retry (any `generation` field).",
    )
    error_budget_flags: list[str] = Field(
        [],
        description="Rows still carrying one of these flags after any retry count as errors toward "
        "sink.max_error_rate (they keep their caption). By default flags never fail a run.",
    )

    @field_validator("retry_flags", "error_budget_flags")
    @classmethod
    def _known_flags(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(FLAGS))
        if unknown:
            raise ValueError(f"unknown flag(s) {unknown}; known: {sorted(FLAGS)}")
        return v

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:

        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a regular expression ({e})") from None
        return v

    @field_validator("retry_generation")
    @classmethod
    def _generation(cls, v: dict[str, Any]) -> dict[str, Any]:
        GenerationConfig.model_validate(v)  # every field has a default: this checks names and values
        return v

    def min_chars_for(self, name: str) -> int:
        return self.min_chars if isinstance(self.min_chars, int) else self.min_chars.get(name, 10)

    def retry_config(self, gen: GenerationConfig) -> GenerationConfig:
        return GenerationConfig.model_validate({**gen.model_dump(), **self.retry_generation})


class OutputConfig(_Strict):
    storage_options: SecretOptions = Field(
        default_factory=dict, repr=False, description="Extra fsspec options for the output."
    )
    max_error_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fail the run (after committing) when more than this share of rows are errors. Bad images "
        "are data, so by default only max_failed_shards fails a run.",
    )
    max_failed_shards: int = Field(
        0,
        ge=0,
        description="Fail the run (after committing) when more shards than this could not be read to their end "
        "(shard_unreadable / shard_truncated rows): one such row may stand for thousands of images. Rerunning "
        "the same command reads those shards again from where they failed.",
    )
    retry_errors: list[str] | Literal["retryable"] = Field(
        "retryable",
        description="A new run reads again the rows whose newest state in earlier runs is an error of these "
        "kinds, and only those rows: 'retryable' (every kind schema.RETRYABLE_KINDS lists: unreadable or "
        "truncated shards, missing files, engine errors and crashes), a list of kinds (permanent ones too, "
        "e.g. decode_error after a decoder fix), or [] for none.",
    )
    reuse_captions: bool = Field(
        True,
        description="Reuse captions of identical image bytes from earlier runs with the same model/prompt/"
        "generation settings instead of a GPU pass, per prompt as rendered for the sample (a template "
        "filled from other metadata is captioned again).",
    )
    commit_rows: int = Field(
        1024,
        gt=0,
        description="Rows of a shard written as one part file. A crash redoes, per shard, the rows not yet in a "
        "part file: up to this many that reached the driver, plus those still in the pipeline.",
    )
    lock_ttl_s: float = Field(
        120.0, gt=0, description="A run's lease on the output expires this long after its last heartbeat."
    )

    @field_validator("retry_errors", mode="before")
    @classmethod
    def _kinds(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("retryable", "none"):
            v = v.split(",")
        if v == "none" or v is None:
            return []
        if isinstance(v, list):
            if "retryable" in v:
                return "retryable"
            unknown = sorted(set(v) - ERROR_KINDS)
            if unknown:
                raise ValueError(
                    f"unknown error kind(s) {unknown}; known: {sorted(ERROR_KINDS)} or 'retryable'"
                )
        return v

    def retry_kinds(self) -> set[str]:
        return set(RETRYABLE_KINDS) if self.retry_errors == "retryable" else set(self.retry_errors)


class ReportConfig(_Strict):
    progress_s: float = Field(
        30.0,
        gt=0,
        description="Seconds between the driver's progress lines (images done / planned, shards committed, "
        "images/s over the last minute, ETA, errors by kind).",
    )
    metrics: bool = Field(
        True,
        description="Export Prometheus metrics through Ray's metrics agent (ray_omnilmm_* on each node's "
        "metrics port; cluster/grafana-omnilmm.json).",
    )
