"""Column names and Arrow schemas, declared once.

Rows move through three shapes: SAMPLE (read from a shard), PIXELS (decoded on CPU) and OUTPUT (captioned,
written to Parquet). Every shape also carries the shard bookkeeping columns; a shard's last row is an
*end marker* (`key` null, `shard_rows` set) that tells the committer how many rows the shard has.
"""

from __future__ import annotations

import pyarrow as pa

from omnilmm_ray.redact import redact_text

# Bookkeeping carried by every internal row; not written to the output table.
SHARD_FIELDS = [
    pa.field("shard_id", pa.string()),
    pa.field("shard_rows", pa.int64()),  # end marker only: image rows in this shard
    pa.field("shard_skipped", pa.int64()),  # end marker only: samples without an image
]

# One row per input image in the output table.
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # shard or file URI
        pa.field("key", pa.string()),  # sample key in the shard; relative path for loose files
        pa.field("sample_index", pa.int64(), nullable=False),  # position of the image in its shard
        pa.field("caption", pa.string()),  # null on failure
        pa.field("error", pa.string()),  # null on success: "<kind>: <short reason>"
        pa.field("error_kind", pa.string()),
        pa.field("width", pa.int32()),  # original size
        pa.field("height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("input_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("sha256", pa.string()),  # of the original image bytes
        pa.field("cached", pa.bool_()),  # all its captions from earlier runs (same bytes, prompt, settings)
        pa.field("metadata", pa.string()),  # sidecar JSON / other Parquet columns, as JSON text
        pa.field("text", pa.string()),  # sidecar .txt
        pa.field("flags", pa.list_(pa.string())),  # quality flags (quality.py); multi-prompt: "<name>:<flag>"
        pa.field("first_caption", pa.string()),  # quality.retry_flags: the first attempt, when retried
        pa.field("first_flags", pa.list_(pa.string())),
    ]
)
# Every quality flag (quality.py), declared once (the `flags` column holds these names; in multi-prompt mode `name:flag`).
FLAGS = {
    "empty": "no text, or only whitespace",
    "truncated": "cut off at generation.max_new_tokens (finish_reason 'length')",
    "repetition": "degenerate repetition: a share of repeated n-grams above quality.repetition_threshold",
    "refusal": "a refusal or boilerplate ('I'm sorry', 'As an AI', 'I cannot'), or the prompt echoed back",
    "too_short": "fewer characters than quality.min_chars for this prompt",
    "unexpected_script": "letters outside quality.expected_scripts above quality.script_threshold",
}

# Multi-prompt mode (`prompts: {name: ...}`): these columns once per prompt, as `<column>_<name>`. The row's
# own caption/prompt/finish_reason/first_* columns stay null; its tokens are the sums over the prompts.
PER_PROMPT = ["caption", "prompt", "input_tokens", "output_tokens", "finish_reason", "flags"]
CAPTION_FIELDS = [
    "caption",
    "input_tokens",
    "output_tokens",
    "finish_reason",
]  # an answer: engines.Caption's order
PER_PROMPT_RETRY = ["first_caption", "first_flags"]

_BASE = ["source", "key", "sample_index", "metadata", "text", "error", "error_kind"]
SAMPLE_SCHEMA = pa.schema(
    [OUTPUT_SCHEMA.field(n) for n in _BASE] + [pa.field("image", pa.binary())] + SHARD_FIELDS
)
PIXELS_SCHEMA = pa.schema(
    [OUTPUT_SCHEMA.field(n) for n in _BASE + ["width", "height", "sha256"]]
    + [pa.field("pixels", pa.binary()), pa.field("pw", pa.int32()), pa.field("ph", pa.int32())]
    + SHARD_FIELDS
)
ENGINE_SCHEMA = pa.schema(list(OUTPUT_SCHEMA) + SHARD_FIELDS)


def prompt_column(column: str, name: str) -> str:
    """`column` of the prompt called `name`; name "" (single-prompt mode) is the column itself."""
    return f"{column}_{name}" if name else column


def output_schema(prompt_names: list[str] | None = None) -> pa.Schema:
    """The output table's schema: OUTPUT_SCHEMA, plus the per-prompt columns in multi-prompt mode."""
    if not prompt_names:
        return OUTPUT_SCHEMA
    extra = [
        pa.field(prompt_column(c, n), OUTPUT_SCHEMA.field(c).type)
        for n in prompt_names
        for c in PER_PROMPT + PER_PROMPT_RETRY
    ]
    return pa.schema(list(OUTPUT_SCHEMA) + extra)


def engine_schema(prompt_names: list[str] | None = None) -> pa.Schema:
    return pa.schema(list(output_schema(prompt_names)) + SHARD_FIELDS) if prompt_names else ENGINE_SCHEMA


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts, missing keys = null) -> a table of exactly `schema`."""
    return pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)


def is_end(t: pa.Table) -> list[bool]:
    return [v is not None for v in t.column("shard_rows").to_pylist()]


# Every error kind, classified once. A later run reads again the rows whose newest state is a retryable error
# (sink.retry_errors); permanent errors describe the bytes themselves, which the same file will give again.
RETRYABLE_KINDS = frozenset(
    {
        "shard_unreadable",  # storage outage, missing credentials, a Parquet image column set wrong
        "shard_truncated",  # an upload or copy still in progress or interrupted; a complete file reads fine
        "missing_file",  # a loose file listed but gone when read: back on a later listing, or never planned
        "engine_error",  # the engine answered with an error for this request (overload, timeout)
        "engine_crash",  # the engine died with this image alone; may be an outage rather than the image
    }
)
PERMANENT_KINDS = frozenset(
    {
        "not_an_image",
        "decode_error",
        "too_many_pixels",
        "empty_image",
        "missing_image",  # null bytes in a Parquet row
        "invalid_name",  # a file or tar member name that is not UTF-8: the key holds it escaped
        "not_a_file",  # a tar member that is a link (never followed) or another non-regular file
        "empty_caption",  # greedy decoding gives the same empty text again
        "missing_prompt_field",  # the prompt template names a field this sample does not have
    }
)
ERROR_KINDS = RETRYABLE_KINDS | PERMANENT_KINDS
# Rows that stand for the rest of a shard: reading stopped there, so how many samples follow is unknown.
SHARD_KINDS = frozenset({"shard_unreadable", "shard_truncated"})


def error(kind: str, reason: str) -> dict:
    """The two error columns of a failed row (a URI in the reason loses any credentials it carries)."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}: declare it in schema.py")
    reason = redact_text(" ".join(str(reason).split()))[:300]
    return {"error": f"{kind}: {reason}", "error_kind": kind}
