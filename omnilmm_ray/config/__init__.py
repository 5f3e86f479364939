"""Job configuration: one pydantic model, loaded from YAML and overridden by CLI flags.

The `Field(description=...)` texts are the reference documentation (`--print-schema`).
Fields that hold credentials are declared `SecretOptions` (or pydantic's `SecretStr` for a single value):
`model_dump` and `repr` show them as `***`, while the code that opens storage reads the attribute itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

# Every section is importable from omnilmm_ray.config, as before the sections had modules of their own.
from omnilmm_ray.config.base import (  # noqa: F401
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    SECRET_FIELDS,
    ConfigError,
    SecretOptions,
    _refuse_credentials,
    _Strict,
)
from omnilmm_ray.config.data import (  # noqa: F401
    EngineConfig,
    GenerationConfig,
    InputConfig,
    PreprocessConfig,
    ScaleConfig,
)
from omnilmm_ray.config.keep import DEFAULT_REFUSALS, OutputConfig, QualityConfig, ReportConfig  # noqa: F401
from omnilmm_ray.redact import MASK, redact_text


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
