"""Keep credentials out of everything the job prints or stores.

Three kinds of secret are recognised, all here:
- config values declared secret (`storage_options` values: see config/base.py), which `model_dump` shows as `***`;
- secrets inside URIs: the password in `scheme://user:password@host/...` and signature/token query parameters
  of signed URLs (`X-Amz-Signature`, Azure SAS `sig`, ...);
- known secret values (from the environment and the config), registered by the CLI, which then wraps its
  stdout/stderr so that any log line, traceback or forwarded Ray worker log carrying one prints `***`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters that authorise a request by themselves (signed URLs, SAS tokens, API keys), lower case.
SECRET_PARAMS = {
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "signature",
    "googleaccessid",
    "awsaccesskeyid",
    "sig",
    "token",
    "access_token",
    "key",
    "api_key",
    "apikey",
    "password",
}
# Environment variables whose values are credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, HF_TOKEN,
# AZURE_STORAGE_KEY, ...). Key *ids* are not secret but are masked anyway where they match.
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|_KEY$|ACCOUNT_KEY|_SAS", re.IGNORECASE)
# Shorter values are not masked in free text: masking every occurrence of a short word would mangle logs.
MIN_SECRET_LEN = 8

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_known: set[str] = set()


# `scheme://USER:SECRET@`: the userinfo as written by hand, where the secret may hold any character but `@`
# (AWS secret keys hold `/` and `+`, which `urlsplit` takes for the start of the path); a user name has no
# `/`, `?`, `#` or `:`. `s3://bucket/a:b@c.jpg` (an object key with `:` and `@`) does not match.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#:@\s]*:[^@\s]*)@")


def uri_has_credentials(uri: str) -> bool:
    """A password in the userinfo, or a query parameter that authorises by itself."""
    if _USERINFO.match(uri):
        return True
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    if not parts.scheme:
        return False
    userinfo = parts.netloc.rpartition("@")[0]
    return ":" in userinfo or any(k.lower() in SECRET_PARAMS for k, _ in parse_qsl(parts.query, True))


def redact_uri(uri: str) -> str:
    """`s3://KEY:SECRET@bucket/x` -> `s3://***@bucket/x`; secret query parameters -> `***`."""
    uri = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", uri, count=1)
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if not parts.scheme:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Free text (a log line, an exception message): URIs redacted and registered secret values masked."""
    text = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    for value in sorted(_known, key=len, reverse=True):  # longest first: one secret may contain another
        if value in text:
            text = text.replace(value, MASK)
    return text


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def register(values: Iterable[Any]) -> None:
    """Remember secret values (strings, or dicts/lists of them) so that `redact_text` masks them."""
    for v in values:
        _known.update(s for s in _strings(v) if len(s) >= MIN_SECRET_LEN)


# Storage options that are not credentials; their values stay readable in messages (an endpoint to check).
PUBLIC_OPTIONS = {"endpoint_url", "region_name", "region", "account_name", "project", "profile"}


def option_secrets(opts: dict[str, Any]) -> list[Any]:
    """The values of storage options (nested ones included) that may be credentials."""
    out: list[Any] = []
    for k, v in opts.items():
        if isinstance(v, dict):
            out += option_secrets(v)
        elif k not in PUBLIC_OPTIONS:
            out.append(v)
    return out


def env_secrets() -> list[str]:
    return [v for k, v in os.environ.items() if SECRET_ENV.search(k)]


class _RedactingStream:
    """A text stream that masks secrets in whatever is written to it, line by line."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(redact_text(s))
        return len(s)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class RedactingFilter(logging.Filter):
    """Masks secrets in log records, for handlers that write to a stream opened before `redacting_output`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


@contextmanager
def redacting_output():
    """Route this process's stdout/stderr (prints, tracebacks, Ray's forwarded worker logs) through
    `redact_text`, and mask secrets in records of the root logger's handlers."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _RedactingStream(out), _RedactingStream(err)
    filt = RedactingFilter()
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        for h in handlers:
            h.removeFilter(filt)
