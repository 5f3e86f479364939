"""The caption stage's batch adapters (`pipeline.build_caption_stage`): a user's rows (an image column of
bytes or paths, any other columns) in and out of the job's row shapes. The user's columns travel packed in
one struct column."""

from __future__ import annotations

import json
import uuid

import pyarrow as pa

from omnilmm_ray import schema
from omnilmm_ray.config import JobConfig, validate
from omnilmm_ray.preprocess import preprocess_batch
from omnilmm_ray.stages import CaptionStage

USER = "__user"
# Our row columns the stage's output leaves out: bookkeeping, and what it derived from the user's columns.
_INTERNAL = {"source", "key", "sample_index", "metadata", "text", *(f.name for f in schema.SHARD_FIELDS)}


def stage_config(cfg: dict | JobConfig) -> JobConfig:
    """A caption stage needs no inputs or output: they are the user's datasets."""
    if isinstance(cfg, JobConfig):
        return cfg
    return validate({"inputs": ["<dataset>"], "output": "<dataset>", **cfg})


def to_samples(batch: pa.Table, cfg: JobConfig, image_column: str) -> pa.Table:
    """The user's rows -> SAMPLE_SCHEMA rows (image bytes read from paths), their columns packed in USER.

    Templates see the user's `text` and `key` columns, and the other non-binary columns as `metadata.NAME`.
    """
    from omnilmm_ray.storage import resolve

    if image_column not in batch.column_names:
        raise ValueError(
            f"the dataset has no column {image_column!r} (columns: {batch.column_names}); pass "
            "image_column= to build_caption_stage"
        )
    taken = sorted(set(batch.column_names) & (set(schema.output_schema(cfg.prompt_names).names) - _INTERNAL))
    if taken:
        raise ValueError(f"the dataset's columns {taken} are columns the caption stage writes; rename them")
    shard = uuid.uuid4().hex  # the engine's crash records key rows by shard id and index
    rows = []
    for i, r in enumerate(batch.to_pylist()):
        img = r[image_column]
        out = {
            "source": "dataset",
            "shard_id": shard,
            "sample_index": i,
            "key": r.get("key"),
            "text": r.get("text"),
        }
        meta = {
            k: v for k, v in r.items() if k not in (image_column, "key", "text") and not isinstance(v, bytes)
        }
        out["metadata"] = json.dumps(meta, default=str) if meta else None
        if isinstance(img, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            img = img.get("bytes") or img.get("path")
        if isinstance(img, str):
            out["source"] = img
            try:
                fs, path = resolve(img, cfg.input.storage_options)
                img = fs.cat_file(path)
            except (OSError, ValueError) as e:
                out.update(schema.error("missing_file", f"{img}: {type(e).__name__}: {e}"))
                img = None
        elif img is None:
            out.update(schema.error("missing_image", "null image"))
        out["image"] = img
        rows.append(out)
    t = schema.table(rows, schema.SAMPLE_SCHEMA)
    packed = pa.StructArray.from_arrays([c.combine_chunks() for c in batch.columns], names=batch.column_names)
    return t.append_column(USER, packed)


def preprocess_keeping_user(batch: pa.Table, cfg: JobConfig) -> pa.Table:
    user = batch.column(USER)
    return preprocess_batch(batch.drop_columns([USER]), cfg.preprocess).append_column(USER, user)


class UserCaptionStage(CaptionStage):
    """The engine actor of a caption stage: CaptionStage, passing the user's columns through (it returns
    one row per input row, in order), with no earlier run to reuse captions from."""

    def __init__(self, cfg: JobConfig):
        super().__init__(cfg, run_uri="")

    def __call__(self, batch: pa.Table) -> pa.Table:
        user = batch.column(USER)
        return from_output(super().__call__(batch.drop_columns([USER])).append_column(USER, user))


def from_output(batch: pa.Table) -> pa.Table:
    """Engine rows with USER -> the user's columns followed by the caption columns."""
    packed = batch.column(USER).combine_chunks()
    cols = {f.name: packed.field(i) for i, f in enumerate(packed.type)}
    for name in batch.column_names:
        if name != USER and name not in _INTERNAL:
            cols[name] = batch.column(name)
    return pa.table(cols)
