"""Object-store access problems that are the user's to fix, turned into one-line `ConfigError`s.

An unreachable endpoint, missing or refused credentials and a missing bucket surface from botocore, s3fs,
aiohttp, gcsfs or adlfs under many names; `storage_access` maps them in one place to a message that names
the config field (`inputs` or `output`) and says what to do. Anything else propagates unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from omnilmm_ray.config import ConfigError
from omnilmm_ray.redact import redact_text

_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerTimeoutError",
    "ConnectionRefusedError",
    "gaierror",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationPermissionMismatch",
    "AuthenticationFailed",
    "403",
}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def as_config_error(field: str, uris: str | list[str], e: BaseException) -> ConfigError | None:
    """The user-facing error for a storage failure on `field`'s URIs, or None if it is not one of those."""
    what = uris if isinstance(uris, str) else ", ".join(uris)
    opts = "input.storage_options" if field == "inputs" else "sink.storage_options"
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    fix = None
    for c in _chain(e):
        name = type(c).__name__
        code = (
            str(getattr(c, "response", {}).get("Error", {}).get("Code", "")) if name == "ClientError" else ""
        )
        if name in _UNREACHABLE:
            fix = f"cannot reach the storage endpoint; check it (AWS_ENDPOINT_URL or {opts}) and the network"
        elif name in _NO_CREDENTIALS:
            fix = (
                "no credentials found; set them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            )
            fix += f"an instance role or workload identity) or in {opts}"
        elif code in _DENIED_CODES or isinstance(c, PermissionError):
            fix = f"access denied; check the credentials (environment or {opts}) and the bucket's permissions"
        elif code == "NoSuchBucket" or (
            isinstance(c, FileNotFoundError) and "bucket does not exist" in str(c)
        ):
            fix = "the bucket does not exist; create it or fix the URI"
        if fix:
            break
    if fix is None:
        return None
    return ConfigError(redact_text(f"{field}: {what}: {fix} ({reason})"))


@contextmanager
def storage_access(field: str, uris: str | list[str]) -> Iterator[None]:
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        err = as_config_error(field, uris, e)
        if err is None:
            raise
        raise err from None
