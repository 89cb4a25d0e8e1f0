"""URIs: credentials taken out of them (the one place they are taken out of what we log, print, tag or send), and
an S3 URI's bucket and prefix."""
from __future__ import annotations

import re

from bin_counter import BinCounterError

# user:password@ (or token@) in any URI, up to the last @ of its authority; and secrets passed as query parameters
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#]*)@")
# SQLAlchemy (Optuna's storage) reads user:password@ by its own grammar: the password runs to the next @ and may
# hold `/`, `?` and `#` unencoded, where RFC 3986's userinfo above stops (make_url's pattern, minus what cannot be
# in a URI quoted in a message: spaces and quotes).
_SQLALCHEMY_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>(?P<user>[^\s:/'\"]*):[^\s@'\"]*)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey)=)[^&\s#]*",
                           re.IGNORECASE)


def redact_uri(text: str, drop: bool = False) -> str:
    """`text` (a URI, or a message quoting URIs) with every password and token masked as ***.

    The one place credentials are taken out of what we log, print, tag or send. `drop=True` removes them
    instead, leaving a URI that still works for a reader authenticated another way (MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, or an IAM role).
    """
    def userinfo(match: re.Match) -> str:
        if drop:
            return match["scheme"]
        user, has_password, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if has_password else f"{match['scheme']}***@"

    text = _USERINFO.sub(userinfo, _SQLALCHEMY_USERINFO.sub(userinfo, str(text)))
    if drop:
        text = _SECRET_QUERY.sub(lambda match: match["key"][0].replace("&", ""), text)  # keeps a leading ?
        return re.sub(r"\?(?=[\s#]|$)", "", text.replace("?&", "?"))
    return _SECRET_QUERY.sub(lambda match: f"{match['key']}***", text)


def has_credentials(uri: str) -> bool:
    return redact_uri(uri) != uri


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> (`bucket`, `some/prefix/`)."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise BinCounterError(f"not an S3 URI: {uri!r} (expected s3://bucket[/prefix])")
    bucket, _, prefix = uri[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""
