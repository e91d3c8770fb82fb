"""URLs that may carry secrets: masking them for display, refusing literal ones in params.yaml,
and resolving `${ENV_VAR}` references from the environment (settings.py renders every endpoint
through these)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlsplit

MASK = "***"

_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_SECRET_QUERY_KEY = re.compile(r"pass(word|wd)?|pwd|secret|token|access_?key|api_?key", re.I)
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|ACCESS_KEY", re.I)


class SettingsError(ValueError):
    """An endpoint that cannot be rendered; the message names the key or variable and the fix."""


def _netloc_span(url: str) -> tuple[int, int] | None:
    """(start, end) of the netloc of `scheme://netloc/...`, or None for a non-URL."""
    match = SCHEME.match(url)
    if not match:
        return None
    start = match.end()
    ends = [i for i in (url.find(c, start) for c in "/?#") if i >= 0]
    return start, min(ends, default=len(url))


def _userinfo_span(url: str) -> tuple[int, int] | None:
    span = _netloc_span(url)
    if span is None:
        return None
    at = url.rfind("@", *span)
    return (span[0], at) if at >= 0 else None


def mask_url(url: str) -> str:
    """`url` with the password of its user info and secret-looking query values as `***`."""
    userinfo = _userinfo_span(url)
    if userinfo is not None:
        user, colon, _ = url[userinfo[0]:userinfo[1]].partition(":")
        if colon:
            url = f"{url[:userinfo[0]]}{user}:{MASK}{url[userinfo[1]:]}"
    base, question, query = url.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        parts = [f"{k}={MASK}" if _SECRET_QUERY_KEY.search(k) else f"{k}={v}" if eq else k
                 for k, eq, v in (p.partition("=") for p in query.split("&"))]
        url = f"{base}?{'&'.join(parts)}{hash_}{fragment}"
    return url


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/{1,2}[^\s'\"<>]+")


def mask_secrets(text: str) -> str:
    """`text` (an error message, a log line) with every URL in it masked as `mask_url` does.

    A path that once was a URL counts too: `Path("s3://u:p@b")` prints as `s3:/u:p@b`.
    """
    def mask(match: re.Match) -> str:
        url = match.group(0)
        if "://" in url:
            return mask_url(url)
        return mask_url(url.replace(":/", "://", 1)).replace("://", ":/", 1)  # as it was

    return _URL_IN_TEXT.sub(mask, text)


def _is_placeholder(text: str) -> bool:
    return bool(re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", text))


def refuse_literal_secrets(value: str, key: str) -> None:
    """A URL from params.yaml may carry a secret only as a `${ENV_VAR}` reference."""
    userinfo = _userinfo_span(value)
    hint = (f"put it in an environment variable and write it as ${{VAR}} in {key} "
            f"(e.g. postgresql://user:${{DYNROUTE_DB_PASSWORD}}@host/db)")
    if userinfo is not None:
        _, colon, password = value[userinfo[0]:userinfo[1]].partition(":")
        if colon and password and not _is_placeholder(password):
            raise SettingsError(f"{key} = {mask_url(value)} holds a password; params.yaml is "
                                f"committed, so secrets never go there: {hint}")
    query = urlsplit(value).query if SCHEME.match(value) else ""
    for name, secret in parse_qsl(query, keep_blank_values=True):
        if _SECRET_QUERY_KEY.search(name) and secret and not _is_placeholder(secret):
            raise SettingsError(f"{key} = {mask_url(value)} holds a secret in its query "
                                f"({name}=…); {hint}")


def interpolate(value: str, where: str, env: Mapping[str, str], secrets: set[str]) -> str:
    """Replace `${VAR}` from `env`; a value placed in a URL's user info is percent-encoded."""
    if "${" in value and value.count("${") != len(_PLACEHOLDER.findall(value)):
        raise SettingsError(f"{where} = {value!r}: unclosed '${{'; write ${{VAR}}")
    userinfo = _userinfo_span(value)
    out, last = [], 0
    for match in _PLACEHOLDER.finditer(value):
        name = match.group(1)
        if not _ENV_NAME.match(name):
            raise SettingsError(f"{where} = {value!r}: ${{{name}}} is not an environment "
                                f"variable name (letters, digits, _)")
        if name not in env:
            raise SettingsError(f"{where} refers to ${{{name}}}, which is not set in the "
                                f"environment; export {name}=… before running")
        resolved = env[name]
        in_userinfo = userinfo is not None and userinfo[0] <= match.start() < userinfo[1]
        if in_userinfo or _SECRET_NAME.search(name):
            secrets.add(resolved)
        out += [value[last:match.start()], quote(resolved, safe="") if in_userinfo else resolved]
        last = match.end()
    return "".join([*out, value[last:]])
