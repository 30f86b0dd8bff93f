# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Redaction of secrets in anything slipway prints, logs or reports.

Two mechanisms, both conservative:
- ``redact_text``: removes passwords embedded in connection URLs (``scheme://user:pw@host``),
  the values of ``KEY=value`` / ``"KEY": "value"`` pairs whose key names a secret, bearer tokens,
  and any literal secret the caller knows (``known``).
- ``redact_mapping``: copies a dict/list tree replacing values under secret-looking keys.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

MASK = "***"

# Keys whose values are secrets. DATABASE_URL embeds a password, so it is masked whole.
_SECRET_KEY = re.compile(
    r"((?:^|_)PASS(?:$|_|WORD|WD|PHRASE)|PASSWORD|PASSWD|PWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|(?:^|_)KEY$|CREDENTIAL|"
    r"DATABASE_URL|DSN|AUTH)",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s\"']*:)(?P<pw>[^@\s\"']+)(?P<post>@)")
_ENV_PAIR = re.compile(
    r"(?P<key>\b[A-Za-z_][A-Za-z0-9_]*)(?P<sep>\s*=\s*)(?P<val>\"[^\"]*\"|'[^']*'|[^\s,;]+)"
)
_JSON_PAIR = re.compile(r"(?P<key>\"[A-Za-z_][A-Za-z0-9_]*\")(?P<sep>\s*:\s*)(?P<val>\"(?:[^\"\\]|\\.)*\")")
_BEARER = re.compile(r"(?P<pre>\bBearer\s+)(?P<tok>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)


def is_secret_key(key):
    """True when a variable/field name looks like it holds a secret."""
    return bool(_SECRET_KEY.search(str(key)))


def redact_text(text, known=()):
    """Return ``text`` with secrets masked. ``known`` are literal secret values to mask anywhere."""
    if text is None:
        return text
    out = str(text)
    for secret in sorted((s for s in known if s), key=len, reverse=True):
        out = out.replace(secret, MASK)
    out = _URL_PASSWORD.sub(lambda m: m.group("pre") + MASK + m.group("post"), out)
    out = _BEARER.sub(lambda m: m.group("pre") + MASK, out)

    def _pair(m):
        if is_secret_key(m.group("key").strip('"')) and not re.match(r"^\$\d+$", m.group("val")):  # $1: a parameter
            val = m.group("val")
            quote = val[0] if val[:1] in ("'", '"') else ""
            return m.group("key") + m.group("sep") + quote + MASK + quote
        return m.group(0)

    out = _JSON_PAIR.sub(_pair, out)
    out = _ENV_PAIR.sub(_pair, out)
    return out


_KEY_VALUES = re.compile(r"(Key \((?:[^()]|\([^()]*\))*\))=\((?:[^()]|\([^()]*\))*\)")
_FAILING_ROW = re.compile(r"(Failing row contains) \(.*?\)(\.?)(?=\s|$|\\n|\"|')")
_QUERY_STRING = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#\"']*|\s/[^\s?#\"']*)\?[^\s#\"']+", re.IGNORECASE)
_HEADER = re.compile(r"\b((?:Proxy-)?Authorization|Cookie|Set-Cookie)(\s*[:=]\s*)[^\r\n\"',}]+", re.IGNORECASE)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PARAMETERS = re.compile(r"(parameters:) \$\d+ = .*", re.IGNORECASE)


def scrub_user_data(text):
    """``text`` without the user data logs tend to carry: the key values of a unique violation,
    the row of a not-null one, bind parameters, URL query strings, Authorization and cookie
    headers, e-mail addresses (what an app's or PostgreSQL's log line may hold)."""
    if text is None:
        return text
    out = _KEY_VALUES.sub(lambda m: m.group(1) + "=(...)", str(text))
    out = _FAILING_ROW.sub(lambda m: m.group(1) + " (...)" + m.group(2), out)
    out = _PARAMETERS.sub(lambda m: m.group(1) + " (not shown)", out)
    out = _QUERY_STRING.sub(lambda m: m.group(1) + "?...", out)
    out = _HEADER.sub(lambda m: m.group(1) + m.group(2) + MASK, out)
    return _EMAIL.sub("<e-mail>", out)


def redact_mapping(value, known=()):
    """Deep-copy ``value`` (dicts/lists/scalars) masking values under secret-looking keys."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if is_secret_key(key) and isinstance(item, (str, int, float)) and not isinstance(item, bool) and item != "":
                result[key] = MASK
            else:
                result[key] = redact_mapping(item, known)
        return result
    if isinstance(value, list):
        return [redact_mapping(item, known) for item in value]
    if isinstance(value, str):
        return redact_text(value, known)
    return value
