# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""The one HTTP client of slipway's modules (standard library only; runs with the target's Python).

The URLs slipway calls are the app's own, on the host or an internal network: requests never go
through a proxy, whatever the environment says. An HTTP error status is an answer like any other
(``(status, text, doc)``); only when no answer came (refused, reset, timed out, DNS) does
``request`` raise, with the library's exception, for the caller to word in one line.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

from ansible.module_utils.six.moves.urllib.error import HTTPError
from ansible.module_utils.six.moves.urllib.request import ProxyHandler, Request, build_opener


def parse_json(text):
    """The JSON document ``text`` holds, or None when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


class HttpClient(object):
    """Requests without a proxy; one instance may serve several threads."""

    def __init__(self, timeout=10.0):
        self.timeout = timeout
        self.opener = build_opener(ProxyHandler({}))

    def request(self, url, method="GET", body=None, headers=None, timeout=None, limit=None):
        """(status, text, doc) of one request: ``body`` is sent as JSON, ``limit`` caps the bytes
        read of the answer, ``doc`` is the answer parsed as JSON (None when it is not JSON).
        Raises what urllib raises when no answer came."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = Request(url, data=data, method=method.upper())
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            resp = self.opener.open(req, timeout=self.timeout if timeout is None else timeout)
            try:
                status, raw = resp.getcode(), _read(resp, limit)
            finally:
                resp.close()
        except HTTPError as exc:
            status, raw = exc.code, _read(exc, limit)
        text = raw.decode("utf-8", "replace")
        return status, text, parse_json(text)


def _read(answer, limit):
    return answer.read(limit) if limit else answer.read()
