"""Job configuration: one pydantic model, loaded from YAML and overridden by CLI flags.

The `Field(description=...)` texts are the reference documentation (`--print-schema`).
Fields that hold credentials are declared `SecretOptions` (or pydantic's `SecretStr` for a single value):
`model_dump` and `repr` show them as `***`, while the code that opens storage reads the attribute itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from omnilmm_ray.redact import MASK, redact_text, redact_uri, uri_has_credentials
from omnilmm_ray.schema import ERROR_KINDS, FLAGS, RETRYABLE_KINDS

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
DEFAULT_PROMPT = "Describe this image in one detailed sentence."


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the field and what to do."""


# fsspec storage options hold credentials (key, secret, token, account_key, sas_token, ...). Dumped (the run
# summary, --dry-run) they keep their keys, so a reader sees which options were set, but not the values.
SecretOptions = Annotated[
    dict[str, Any], PlainSerializer(lambda opts: {k: MASK for k in opts}, return_type=dict[str, str])
]
SECRET_FIELDS = ("input.storage_options", "sink.storage_options")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Strict):
    parquet_image_columns: list[str] = Field(
        ["jpg", "image", "png", "webp", "jpeg"],
        description="Binary columns tried, in order, as the image bytes of Parquet inputs.",
    )
    parquet_key_column: str = Field("key", description="Parquet column used as the sample key when present.")
    files_per_shard: int = Field(
        1000, gt=0, description="Loose image files are grouped into work units of this many files."
    )
    storage_options: SecretOptions = Field(
        default_factory=dict,
        repr=False,
        description="Extra fsspec storage options for the inputs (credentials and endpoint also come from "
        "the usual environment, e.g. AWS_ENDPOINT_URL).",
    )
    read_attempts: int = Field(
        3,
        ge=1,
        description="Reads of a shard (after the storage client's own retries) before it counts as unreadable.",
    )
    on_unreadable_shard: Literal["error_rows", "fail"] = Field(
        "error_rows",
        description="A shard that stays unreadable after retries becomes error rows, or fails the run.",
    )


class PreprocessConfig(_Strict):
    max_side: int = Field(448, gt=0, description="Images are resized so the long side is at most this.")
    max_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels than this are refused (decompression bombs)."
    )
    jpeg_draft: bool = Field(
        True,
        description="Let libjpeg decode large JPEGs directly at 1/2, 1/4 or 1/8 scale (never below max_side).",
    )
    offload_processor: bool = Field(
        True,
        description="Run the model's own image processor on the CPU workers and hand the engine ready patches "
        "(Qwen2-VL family on TurboMind; the model folder must be readable by the driver). Other models, or "
        "false, hand the engine resized images and let it run its processor.",
    )
    batch_size: int = Field(32, gt=0, description="Rows per CPU preprocessing task call.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per preprocessing task.")


def _refuse_credentials(uri: str | None, stored: str, opts: str) -> None:
    """Every URI the job accepts: one carrying credentials is refused before anything runs, since it would
    reach places no redaction covers (`stored`; Ray's own session logs, where actor arguments are written)."""
    if uri and uri_has_credentials(uri):
        raise ValueError(
            f"{redact_uri(uri)} carries credentials (a password or a signed-URL parameter), which would be "
            f"stored in {stored}; remove them from the URI and pass them through the environment "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an instance role) or {opts}"
        )


class EngineConfig(_Strict):
    backend: Literal["auto", "turbomind", "pytorch", "fake"] = Field(
        "auto",
        description="lmdeploy backend; 'auto' picks TurboMind when it supports the model, else PyTorch. "
        "'fake' is a deterministic CPU stand-in whose captions are placeholders.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="The VLM: a Hugging Face id, a local folder (e.g. a shared volume on every node), or an "
        "object-store folder (s3://bucket/models/Qwen2-VL-2B-Instruct/) that each node downloads once into "
        "engine.cache_dir.",
    )
    cache_dir: str | None = Field(
        None,
        description="Local folder for models downloaded from object storage, one copy per node (default "
        "$OMNILMM_CACHE/models, else /tmp/omnilmm-ray/models). Needs room for the weights.",
    )
    tp: int = Field(1, ge=1, description="Tensor parallel degree: GPUs per engine actor.")
    session_len: int | None = Field(4096, gt=0, description="Max tokens per request (prompt+image+output).")
    cache_max_entry_count: float = Field(
        0.8, gt=0, le=1, description="Share of free GPU memory for KV cache."
    )
    max_batch_size: int | None = Field(None, gt=0, description="Engine's max concurrent requests.")
    quant_policy: Literal[0, 4, 8] = Field(0, description="KV cache quantisation: 0 (off), 4 or 8 bit.")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")
    chat_template: str | None = Field(None, description="lmdeploy chat template name to force.")
    vision_max_batch_size: int = Field(8, gt=0, description="lmdeploy VisionConfig.max_batch_size.")
    start_timeout_s: float = Field(
        900,
        gt=0,
        description="How long to wait for the first engine actor (a worker with `tp` free GPUs: an autoscaler may "
        "be adding one) to start before failing the job.",
    )
    max_crashes_per_image: int = Field(
        2,
        ge=1,
        description="An image becomes an `engine_crash` error row once engines died this many times with it "
        "alone in flight, within one attempt of the job (a kill of the whole job is no engine death). 2, not "
        "1: one death alone can be a coincidence (a GPU fault, an OOM from another process).",
    )
    fake_delay_s: float = Field(
        0.0, ge=0, description="Fake engine only: sleep per batch to emulate GPU time."
    )
    fake_crash_at_batch: int | None = Field(
        None,
        ge=1,
        description="Fake engine only (fault drills): the actor process dies on its Nth batch, once per job.",
    )
    fake_calls_log: str | None = Field(
        None,
        description="Fake engine only: append each batch's image count to this local file (work counting).",
    )
    fake_crash_on_size: tuple[int, int] | None = Field(
        None, description="Fake engine only (fault drills): the actor dies on every image of this (w, h)."
    )
    fake_refuse: str | None = Field(
        None,
        description="Fake engine only (drills): refuse the model with this reason, as lmdeploy refuses a model "
        "no backend serves.",
    )
    fake_blind: bool = Field(
        False,
        description="Fake engine only (drills): take images and ignore their pixels, as lmdeploy 0.18's "
        "PyTorch engine does with MiniCPM-V; the engine's image check (engines/sight.py) refuses it.",
    )
    fake_bad_captions: bool = Field(
        False,
        description="Fake engine only (quality drills): most images get a known-bad caption (repetition, "
        "refusal, empty, cut off, too short, other script), picked from the pixels; with the quality retry's "
        "generation settings all but refusals come back good.",
    )

    @field_validator("model", "cache_dir")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        _refuse_credentials(
            v, "the job's settings, which Ray's logs show", "a credentials file the nodes read"
        )
        return v


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(96, gt=0, description="Caption length limit in tokens.")
    min_new_tokens: int | None = Field(
        None,
        ge=0,
        description="Generate at least this many tokens (benchmarks fix the output length with it).",
    )
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(1, ge=0)
    repetition_penalty: float = Field(1.05, gt=0)
    random_seed: int | None = Field(0, description="Seed for sampling; fixed for reproducible captions.")


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
        import re

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


class ScaleConfig(_Strict):
    batch_size: int = Field(32, gt=0, description="Images per engine call (fixed-size batches to the GPU).")
    min_actors: int = Field(1, ge=1, description="Engine actors kept alive.")
    max_actors: int = Field(1, ge=1, description="Engine actors the pool may grow to.")
    max_batches_in_flight: int = Field(4, ge=1, description="Batches queued per engine actor.")
    concurrent_batches: int = Field(
        2,
        ge=1,
        description="Engine calls running at once in one actor (threads), so TurboMind's continuous batching "
        "starts the next batch while the previous one drains instead of running dry between batches. The "
        "PyTorch engine serialises calls anyway.",
    )
    actor_cpus: float = Field(
        2,
        gt=0,
        description="CPUs reserved per engine actor (a real engine; the fake one takes 0.5). It also sets the "
        "actor's thread count (OMP_NUM_THREADS), so several engines on one host do not oversubscribe its cores.",
    )
    shards_in_flight: int | None = Field(
        None,
        ge=1,
        description="Shards read at once (default 2 per engine actor, at least 4). Fewer shards in flight "
        "means less work redone after a crash (commits are per shard) and less driver memory.",
    )

    @model_validator(mode="after")
    def _pool(self) -> ScaleConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


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


class JobConfig(_Strict):
    inputs: list[str] = Field(..., min_length=1, description="Input URIs or globs (any fsspec protocol).")
    output: str = Field(..., min_length=1, description="Output table URI (local path, s3://, gs://, az://).")
    prompt: str = Field(
        DEFAULT_PROMPT,
        min_length=1,
        description="Instruction sent with every image; a template may name fields of the sample: {text} "
        "(.txt sidecar), {key}, {metadata.NAME} (.json sidecar or Parquet column); {{ }} are literal braces.",
    )
    prompts: dict[str, str] | None = Field(
        None,
        description="Several named prompts per image instead of `prompt` (`{alt: ..., detailed: ..., tags: "
        "...}`): one row per image with caption_<name>, prompt_<name>, ... columns per prompt; all of an "
        "image's requests go to the engine in the same call. Names: lowercase letters, digits, _. Templates "
        "as in `prompt`.",
    )
    quality: QualityConfig = Field(default_factory=QualityConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    sink: OutputConfig = Field(default_factory=OutputConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("inputs", "output")
    @classmethod
    def _no_credentials_in_uris(cls, v: str | list[str], info: ValidationInfo) -> str | list[str]:
        # The URIs are stored in the run's plan and in every row's `source`, and printed in logs; a resumed
        # run reads the plan's URIs again, so they cannot be redacted there. Credentials go elsewhere.
        opts = "input.storage_options" if info.field_name == "inputs" else "sink.storage_options"
        for uri in [v] if isinstance(v, str) else v:
            _refuse_credentials(uri, "the run's plan and rows", opts)
        return v

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        from omnilmm_ray.prompts import parse

        parse(v)
        return v

    @field_validator("prompts")
    @classmethod
    def _named(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        from omnilmm_ray.prompts import parse

        if v is None:
            return v
        if not v:
            raise ValueError("give at least one named prompt, or leave `prompts` out and set `prompt`")
        for name, template in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
                raise ValueError(
                    f"prompt name {name!r} becomes column names (caption_{name}): use lowercase letters, "
                    "digits and _, starting with a letter"
                )
            if not template.strip():
                raise ValueError(f"prompt {name!r} is empty")
            try:
                parse(template)
            except ValueError as e:
                raise ValueError(f"prompt {name!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_prompt_mode(self) -> JobConfig:
        if self.prompts is not None and "prompt" in self.model_fields_set:
            raise ValueError(
                "set either `prompt` (one caption per image) or `prompts` (several named ones), not both"
            )
        return self

    @property
    def prompt_names(self) -> list[str] | None:
        """The prompt names in multi-prompt mode, None in single-prompt mode."""
        return list(self.prompts) if self.prompts is not None else None

    @property
    def model_label(self) -> str:
        return "fake" if self.engine.backend == "fake" else self.engine.model


# CLI flag -> dotted config path. CLI values win over the YAML file.
CLI_FIELDS = {
    "input": "inputs",
    "output": "output",
    "engine": "engine.backend",
    "model": "engine.model",
    "prompt": "prompt",
    "batch_size": "scale.batch_size",
    "tp": "engine.tp",
    "min_actors": "scale.min_actors",
    "max_actors": "scale.max_actors",
    "max_side": "preprocess.max_side",
    "max_new_tokens": "generation.max_new_tokens",
    "fake_delay": "engine.fake_delay_s",
    "max_error_rate": "sink.max_error_rate",
    "max_failed_shards": "sink.max_failed_shards",
    "retry_errors": "sink.retry_errors",
}


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra` on top: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, require_io: bool = True
) -> JobConfig:
    """YAML file (optional) + CLI overrides (flag name -> value, None = not given) -> validated JobConfig.

    `require_io=False` (--print-config) fills missing inputs/output with a placeholder saying what to set."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: cannot read YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: top level must be a mapping of config fields")
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = CLI_FIELDS[flag].split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    for k in ("inputs", "output"):
        if k not in data:
            flag = "--input" if k == "inputs" else "--output"
            if not require_io:
                data[k] = [f"<not set: {flag}>"] if k == "inputs" else f"<not set: {flag}>"
                continue
            raise ConfigError(f"{k}: missing; pass {flag} or set '{k}' in the config file")
    return validate(data)


def validate(data: dict[str, Any]) -> JobConfig:
    """A config mapping -> JobConfig, or a ConfigError naming the first wrong field."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        flags = [f"--{f.replace('_', '-')}" for f, p in CLI_FIELDS.items() if p == where]
        hint = f" (flag {flags[0]})" if flags else ""
        secret = any(where.startswith(f) for f in SECRET_FIELDS)
        got = MASK if secret else redact_text(repr(err.get("input")))
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {msg}; got {got}. Fix '{where}' in the config file{hint}.") from None


def generation_fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """Everything that determines a caption for given image bytes; equal fingerprints may share captions.

    Never storage options or any other credential: rotating a key is not a new labelling configuration.
    """
    fp = {
        "model": cfg.model_label,
        "prompt": cfg.prompt,
        "max_side": cfg.preprocess.max_side,
        "generation": cfg.generation.model_dump(),
        "chat_template": cfg.engine.chat_template,
    }
    # Added only when used, so outputs written before these settings existed keep their fingerprint.
    if cfg.prompts is not None:
        fp["prompts"] = dict(cfg.prompts)
    if cfg.quality.retry_flags:
        # which rows get a second attempt, and with what: both decide the captions kept
        fp["quality_retry"] = cfg.quality.model_dump(exclude={"error_budget_flags"})
    return fp


def fingerprint_prompts(fingerprint: dict[str, Any]) -> list[str]:
    """The prompt names of a settings fingerprint (the output's per-prompt columns); [] for one prompt."""
    return list(fingerprint.get("prompts") or ())


def reuse_settings(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What besides the rendered prompt must match for a caption to be reused: reuse looks captions up by
    (image bytes, rendered prompt), so runs with other prompt texts still serve the prompts they share."""
    return {k: v for k, v in fingerprint.items() if k not in ("prompt", "prompts")}


# generation_fingerprint key -> the config field a user changes
FINGERPRINT_FIELDS = {
    "model": "engine.model",  # 'fake' when engine.backend is fake
    "prompt": "prompt",
    "max_side": "preprocess.max_side",
    "chat_template": "engine.chat_template",
}


def fingerprint_diff(earlier: dict[str, Any], now: dict[str, Any], limit: int = 120) -> str:
    """The settings two fingerprints differ in, as `field: earlier -> now` (long values cut to `limit`)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    def show(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= limit else r[: limit - 3] + "..."

    a, b = flat(earlier), flat(now)
    diffs = [
        f"{FINGERPRINT_FIELDS.get(k, k)}: {show(a.get(k))} -> {show(b.get(k))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return "; ".join(diffs) or "no difference"
