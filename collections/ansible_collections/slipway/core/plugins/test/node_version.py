# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Jinja test ``slipway.core.node_satisfies``: whether a Node.js version (``node --version``:
``v20.11.1``) is in an npm semver range (``package.json``'s ``engines.node``, e.g. ``>=20``,
``^18.17 || >=20``), with npm's own range rules (the node-semver port, in slipway's controller
venv). Runs on the controller, like every Jinja test."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError

try:
    import nodesemver
except ImportError:  # pragma: no cover - the controller venv has it (requirements.txt)
    nodesemver = None


def node_satisfies(version, wanted):
    if nodesemver is None:
        raise AnsibleFilterError("slipway.core.node_satisfies needs the node-semver package in the controller's venv; run ./bootstrap")
    text = str(version or "").strip().lstrip("v")
    if not nodesemver.valid(text, loose=True):
        return False
    return bool(nodesemver.satisfies(text, str(wanted), loose=True))


class TestModule(object):
    def tests(self):
        return {"node_satisfies": node_satisfies}
