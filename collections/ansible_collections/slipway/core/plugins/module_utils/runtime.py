# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""slipway's module runtime on the host, found from inside a module: the runtime holds compiled
code (psycopg, pglast) for one Python X.Y, built on the controller for each Python its hosts run
modules with and unpacked once under ``<state_dir>/runtime/<id>/`` (complete when it holds the
marker). A module that reads the host before anything else picks the runtime of the Python it
runs on itself, so it needs no earlier call to learn that Python, and puts it on ``sys.path``
before it imports what needs psycopg."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import sys

from ansible_collections.slipway.core.plugins.module_utils import layout


def python_version():
    """This interpreter's X.Y (the key of the controller's runtimes)."""
    return "%d.%d" % sys.version_info[:2]


def select(runtimes, app_dir):
    """``{python, executable, id, path, installed}`` for this interpreter: ``id`` the runtime built
    for its X.Y (None when none was), ``installed`` whether that runtime is complete on the host."""
    version = python_version()
    rid = (runtimes or {}).get(version)
    if isinstance(rid, dict):  # the controller's {id, archive}
        rid = rid.get("id")
    path = layout.runtime_dir(app_dir, rid) if rid else None
    installed = bool(path) and os.path.isfile(os.path.join(path, layout.RUNTIME_COMPLETE))
    return {"python": version, "executable": sys.executable, "id": rid, "path": path, "installed": installed}


def activate(found):
    """Put an installed runtime first on ``sys.path`` (what PYTHONPATH does for the later calls)."""
    if found.get("installed") and found["path"] not in sys.path:
        sys.path.insert(0, found["path"])
