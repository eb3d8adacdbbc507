"""Secrets taken out of error text before it is stored, logged or shown.

An error raised by a model's client often quotes the request it failed: an HTTP client's
``raise_for_status()`` names the URL, and providers that take their key in the query
string (Gemini's ``?key=``, Azure's ``?sig=``) put the key in that URL; other clients
echo a header (``Authorization: Bearer ...``, ``x-api-key: ...``) or a URL with a
``user:password@`` part. Every such error became a span's, a record's or a feedback
result's stored reason, a WARNING log line and a line of the dashboard: the key in clear.

:func:`scrub` replaces the secret part of those shapes, and tokens in the well-known key
formats wherever they stand, with ``***``; the rest of the message (the status, the host,
the path) stays, since that is what tells the user what went wrong. Every pattern is
linear in the text (no nested repetition), so a huge message costs what reading it costs.
"""

from __future__ import annotations

import re

__all__ = ["scrub"]

MASK = "***"

# ?key=..., &api_key=..., ?sig=...: query parameters (and form fields) that carry a secret
_PARAMETER = re.compile(
    r"(?i)([?&;](?:key|api[-_]?key|apikey|access[-_]?token|refresh[-_]?token|id[-_]?token"
    r"|token|auth|secret|client[-_]?secret|password|passwd|pwd|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&#\s'\"<>]+")
# Authorization: Bearer ... / Basic ...; and the bare 'Bearer abc' some clients print
_SCHEME = re.compile(r"(?i)\b(?=[bt])((?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{8,}")
# 'x-api-key': '...', "api-key": "...", api_key=..., Authorization: ..., AccountKey=...,
# api_key is '...' (headers, kwargs, connection strings, messages)
_FIELD = re.compile(  # (the lookahead: most positions fail at once — 3 x faster)
    r"(?i)(?=[aoxcsptbpr])((?:x-)?(?:api[-_]?key|apikey|access[-_]?token|secret[-_]?key"
    r"|client[-_]?secret|authorization|x-goog-api-key|ocp-apim-subscription-key|password"
    r"|passwd|pwd|token|bearer[-_]?token|refresh[-_]?token|accountkey|sharedaccesskey"
    r"|secret[-_]?access[-_]?key|private[-_]?key)['\"]?(?:\s*[:=]\s*['\"]?|\s+is\s+['\"])"
    r")(?!bearer\s|basic\s|\*\*\*)[^'\"\s,;}&)]+")
_FIELD_WORDS = ("key", "token", "secret", "authorization", "password", "passwd", "pwd")
# "Incorrect API key provided: ..." (OpenAI's 401, whatever the key looks like)
_PROVIDED = re.compile(r"(?i)(api key provided:\s*)\S+")
# scheme://user:password@host
_USERINFO = re.compile(r"(://[^:/@\s?#'\"]*:)[^/\s?#'\"]*@")
# keys in the formats providers issue, wherever they appear
_KEY_FORMATS = re.compile(
    r"\b(?:sk-(?:ant-|proj-|svcacct-)?[A-Za-z0-9_-]{16,}"  # OpenAI, Anthropic
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe
    r"|AIza[0-9A-Za-z_-]{30,}"  # Google
    r"|xai-[A-Za-z0-9]{20,}"  # xAI
    r"|gsk_[A-Za-z0-9]{20,}"  # Groq
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"  # JSON web tokens
    r"|(?:AKIA|ASIA)[0-9A-Z]{16})\b")  # AWS access key ids
_PEM = re.compile(r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----[A-Za-z0-9+/=\s]*")


def scrub(text: str) -> str:
    """`text` with the secrets it quotes replaced by ``***`` (the text itself when it holds
    none of the shapes above)."""
    if not text:
        return text
    lowered = text.lower()
    if "-----BEGIN" in text:  # (first: its header would be taken for a field's value)
        text = _PEM.sub(MASK, text)
    if "://" in text:
        text = _USERINFO.sub(rf"\1{MASK}@", text)
    if "=" in text:
        text = _PARAMETER.sub(rf"\1{MASK}", text)
    if "bearer" in lowered or "basic" in lowered or "token" in lowered:
        text = _SCHEME.sub(rf"\1{MASK}", text)
    if any(word in lowered for word in _FIELD_WORDS):
        text = _FIELD.sub(rf"\1{MASK}", text)
    if "provided" in lowered:
        text = _PROVIDED.sub(rf"\1{MASK}", text)
    return _KEY_FORMATS.sub(MASK, text)
