# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""One line of text for a message: what a failed command, server or library said, made fit to
stand inside a one-line error (slipway's modules fail with one line, never a traceback).

``one_line`` does not redact: callers pass its result (or its input) through
``redact.redact_text`` with the secrets they know.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

ELLIPSIS = "..."
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR_WORDS = ("error", "fatal")


def strip_ansi(text):
    """``text`` without terminal colour/cursor codes."""
    return _ANSI.sub("", text)


def lines_of(text):
    """The non-blank lines of ``text``, stripped, colour codes removed."""
    return [line.strip() for line in strip_ansi(str(text or "")).splitlines() if line.strip()]


def one_line(text, limit=None, pick=None, default="", ellipsis=ELLIPSIS):
    """``text`` (colour codes removed) as one line:

    - ``pick=None``: all of it, white space folded to single spaces;
    - ``"first"`` / ``"last"``: its first / last non-blank line (stripped);
    - ``"error"``: its first line naming an error (``error``, ``fatal``), else its first line;
    - an int ``n``: its last ``n`` non-blank lines, joined by `` | ``.

    ``default`` when nothing is left; cut to ``limit`` characters (the cut ends in ``ellipsis``)."""
    if pick is None:
        line = " ".join(strip_ansi(str(text or "")).split())
    else:
        lines = lines_of(text)
        if pick == "error":
            lines = [ln for ln in lines if any(word in ln.lower() for word in _ERROR_WORDS)] or lines
            line = lines[0] if lines else ""
        elif pick == "first":
            line = lines[0] if lines else ""
        elif pick == "last":
            line = lines[-1] if lines else ""
        else:
            line = " | ".join(lines[-int(pick):])
    line = line or default
    if limit is not None and len(line) > limit:
        line = line[: max(0, limit - len(ellipsis))] + ellipsis
    return line
