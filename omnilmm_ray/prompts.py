"""Prompt templates: `"The alt text was: {text}. Describe the image."`, `"Product: {metadata.title}"`.

A template names fields of the sample it is sent with: `text` (the `.txt` sidecar), `key`, and
`metadata.<field>` (a field of the `.json` sidecar or another column of a Parquet input; `a.b` goes into
nested objects). `{{` and `}}` are literal braces. Templates are checked when the config is loaded; a sample
that lacks a field its prompt needs becomes a `missing_prompt_field` error row naming the field.

Prompts are rendered where earlier captions are looked up (reuse.apply_reuse, keyed on the rendered text)
and again in the engine stage, both through `render_row`: the same sample always gives the same text.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

from omnilmm_ray import schema

ROOTS = ("text", "key", "metadata")


class MissingField(KeyError):
    def __init__(self, field: str, why: str):
        super().__init__(field)
        self.field, self.why = field, why

    def __str__(self) -> str:
        return f"{{{self.field}}}: {self.why}"


@dataclass(frozen=True)
class Template:
    source: str
    parts: tuple[tuple[str, str | None], ...]  # (literal text, field or None)

    @property
    def fields(self) -> list[str]:
        return [f for _, f in self.parts if f is not None]

    def render(self, sample: dict, metadata: dict | None = None) -> str:
        """`sample`: a row with `text`, `key`, `metadata` (JSON text); `metadata`: that JSON already parsed."""
        if not self.fields:
            return self.source
        out = []
        for literal, field in self.parts:
            out.append(literal)
            if field is not None:
                out.append(_value(field, sample, metadata))
        return "".join(out)


def parse(template: str) -> Template:
    """Raises ValueError saying what is wrong with the template."""
    parts = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{e} in {template!r}; write a literal brace as {{{{ or }}}}") from None
    for literal, field, spec, conversion in parsed:
        if field is None:
            parts.append((literal, None))
            continue
        if spec or conversion or not field:
            raise ValueError(
                f"'{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}' in "
                f"{template!r}: a field is {{text}}, {{key}} or {{metadata.NAME}}, without format spec; write "
                "a literal brace as {{ or }}"
            )
        root, _, rest = field.partition(".")
        if root not in ROOTS or (root == "metadata") != bool(rest) or (rest and "" in rest.split(".")):
            raise ValueError(
                f"unknown field {{{field}}} in {template!r}: use {{text}}, {{key}} or {{metadata.NAME}} "
                "(a field of the .json sidecar or a Parquet column); write a literal brace as {{ or }}"
            )
        parts.append((literal, field))
    return Template(template, tuple(parts))


def templates(prompt: str, prompts: dict[str, str] | None) -> dict[str, Template]:
    """The job's templates by prompt name; the single `prompt` is named ""."""
    return {name: parse(t) for name, t in (prompts or {"": prompt}).items()}


def render_row(templates: dict[str, Template], row: dict) -> dict[str, str] | None:
    """The row's prompts by name; None, with the row made a `missing_prompt_field` error row (its `error`
    and `error_kind` set), when a template names a field the sample lacks."""
    meta = parse_metadata(row) if any(t.fields for t in templates.values()) else None
    try:
        return {name: t.render(row, meta) for name, t in templates.items()}
    except MissingField as e:
        which = next(n for n, t in templates.items() if e.field in t.fields)
        row.update(schema.error("missing_prompt_field", f"prompt{' ' + repr(which) if which else ''} {e}"))
        return None


def parse_metadata(sample: dict) -> dict | None:
    raw = sample.get("metadata")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _value(field: str, sample: dict, metadata: dict | None) -> str:
    root, _, rest = field.partition(".")
    if root != "metadata":
        v = sample.get(root)
        if v is None:
            raise MissingField(
                field, f"the sample has no {root}" + (" (.txt sidecar)" if root == "text" else "")
            )
        return str(v)
    if metadata is None:
        raise MissingField(field, "the sample has no JSON metadata (.json sidecar or other Parquet columns)")
    v = metadata
    for i, name in enumerate(rest.split(".")):
        if not isinstance(v, dict) or v.get(name) is None:
            where = ".".join(["metadata", *rest.split(".")[:i]])
            raise MissingField(field, f"{where} has no field {name!r}")
        v = v[name]
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


# Kinds of rows whose prompts rendered (the engine was asked, or would have been): their samples have the
# template's fields. Rows failing before rendering (decode errors, ...) say nothing about the template.
_RENDERED_KINDS = {None, "engine_error", "empty_caption", "engine_crash"}


class TypoCheck:
    """A template field that no sample of the night has is a typo (`{metadata.tittle}`), not data: the job
    stops with a config error before it seals rows that would all read `missing_prompt_field`. A field
    missing from only some samples (a Parquet input beside tars with `.txt` sidecars) stays an error row.

    Decided over every row of the attempt, not its first shard, so the order shards finish in never turns
    a mixed input into a typo; rows missing a field never reach the engine, so waiting costs reads only."""

    def __init__(self, active: bool):
        self.active = active
        self.rendered = self.missing = 0
        self.example: tuple[str, str] | None = None  # (source, error) of a row missing a field

    def observe(self, batch) -> None:
        if not self.active:
            return
        cols = batch.select(["shard_rows", "error_kind", "error", "source"]).to_pydict()
        for end, kind, err, src in zip(*cols.values()):
            if end is not None:
                continue
            if kind == "missing_prompt_field":
                self.missing += 1
                self.example = self.example or (src, err)
            elif kind in _RENDERED_KINDS:
                self.rendered += 1

    def verdict(self) -> str | None:
        """The config error to stop with, once every batch was observed; else None."""
        if self.rendered or not self.missing:
            return None
        source, err = self.example
        return (
            f"prompt: none of the {self.missing} samples read has the field the template names (e.g. {source}: "
            f"{err}): a typo? Fix the template and rerun; nothing was sealed"
        )
