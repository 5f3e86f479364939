"""What every config section shares: strict models, the error type, secret storage options, and the
check that no URI carries credentials."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
)

from omnilmm_ray.redact import MASK, redact_uri, uri_has_credentials

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


def _refuse_credentials(uri: str | None, stored: str, opts: str) -> None:
    """Every URI the job accepts: one carrying credentials is refused before anything runs, since it would
    reach places no redaction covers (`stored`; Ray's own session logs, where actor arguments are written)."""
    if uri and uri_has_credentials(uri):
        raise ValueError(
            f"{redact_uri(uri)} carries credentials (a password or a signed-URL parameter), which would be "
            f"stored in {stored}; remove them from the URI and pass them through the environment "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an instance role) or {opts}"
        )
