# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""The app directory's releases and its environment file, as slipway reads them on the host: which
releases are installed (complete: their marker names them), which one ``current`` points at, and
the ``shared/.env`` text an inventory's ``slipway_app_env`` makes (app_release writes it; the
deploy's preflight compares it with the file to tell a deploy that changes nothing)."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re

from ansible_collections.slipway.core.plugins.module_utils import layout


def installed(releases_dir, rid):
    try:
        with open(layout.built_marker(os.path.join(releases_dir, rid))) as handle:
            return handle.read().strip() == rid
    except OSError:
        return False


def current_release(app_dir):
    link = layout.current_link(app_dir)
    if not os.path.islink(link):
        return None
    return os.path.basename(os.readlink(link).rstrip("/"))


def installed_releases(releases_dir):
    """Installed releases, newest first (by the time their marker was written)."""
    found = []
    for name in os.listdir(releases_dir) if os.path.isdir(releases_dir) else []:
        if name.startswith(".") or not installed(releases_dir, name):
            continue
        found.append((os.path.getmtime(layout.built_marker(os.path.join(releases_dir, name))), name))
    return [name for _, name in sorted(found, reverse=True)]


ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_value(key, value):
    """One value as dotenv (and the reference app's parser) reads it back as written: plain text
    bare; else single-quoted (taken literally); a value with a newline double-quoted with \\n (the
    only escapes dotenv expands). Booleans as true/false. Raises ValueError naming the key (never
    the value) for a value no .env quoting can carry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = "" if value is None else str(value)
    if re.match(r"^[A-Za-z0-9_@%+=:,./-]*$", text):
        return text
    if "'" not in text and "\n" not in text and "\r" not in text:
        return "'%s'" % text
    if '"' not in text and "\\" not in text:
        return '"%s"' % text.replace("\n", "\\n").replace("\r", "\\r")
    raise ValueError("slipway_app_env %s: its value holds quotes of both kinds or a backslash with a newline, "
                     "which a .env file cannot carry; simplify it (or let the app read it from elsewhere)" % key)


def env_text(env):
    """``shared/.env``'s text for the mapping ``env``: one KEY=VALUE line per key, sorted (values as
    env_value writes them). Raises ValueError naming a bad key (never a value)."""
    lines = ["# written by slipway (inventory: slipway_app_env); mode 0600"]
    for key in sorted(env):
        if not ENV_KEY.match(str(key)):
            raise ValueError("slipway_app_env key %r is not an environment variable name; use [A-Za-z_][A-Za-z0-9_]*" % key)
        lines.append("%s=%s" % (key, env_value(key, env[key])))
    return "\n".join(lines) + "\n"


def env_keys(text):
    """The variable names a .env text sets (``KEY=...`` lines, an ``export`` prefix allowed)."""
    keys = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        name = line.split("=", 1)[0].strip()
        if "=" in line and ENV_KEY.match(name):
            keys.add(name)
    return keys
