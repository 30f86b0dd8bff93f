# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """Connection options of slipway's PostgreSQL modules (argument spec: module_utils/postgres.py)."""

    DOCUMENTATION = r"""
options:
  login_host:
    description: Database host or unix socket directory.
    type: str
  login_port:
    description: Database port.
    type: int
    default: 5432
  login_user:
    description: Database role.
    type: str
  login_password:
    description: Password of I(login_user) (give it from ansible-vault; it is never returned or logged).
    type: str
  login_db:
    description: Database name.
    type: str
    aliases: [db]
  connect_timeout:
    description: Seconds to wait for the database connection.
    type: int
    default: 10
"""
