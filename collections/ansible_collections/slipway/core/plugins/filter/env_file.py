# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Jinja filter ``slipway.core.env_file_text``: the ``shared/.env`` text a mapping (the inventory's
``slipway_app_env`` with DATABASE_URL and PORT: the role slipway's ``slipway_env_file``) makes, as
module_utils/appdir.py's env_text writes it. The deploy passes this one text to app_release and
app_preflight (``env_content``, no_log) rather than the mapping: Ansible masks every value of a
no_log parameter wherever it occurs in a module's result, so a value such as ``1`` or ``3000``
would also mask it inside a release id, a path or a size. Runs on the controller, like every filter."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible_collections.slipway.core.plugins.module_utils.appdir import env_text


def env_file_text(env):
    """env_text(``env``); a key that is no variable name, or a value no .env can carry, is one line
    naming the key (never a value)."""
    try:
        return env_text(dict(env))
    except ValueError as exc:
        raise AnsibleFilterError(str(exc))


class FilterModule(object):
    def filters(self):
        return {"env_file_text": env_file_text}
