# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""The connection options every slipway PostgreSQL module takes (documented in doc_fragments/postgres.py)."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type


def postgres_argument_spec():
    return dict(
        login_host=dict(type="str"),
        login_port=dict(type="int", default=5432),
        login_user=dict(type="str"),
        login_password=dict(type="str", no_log=True),
        login_db=dict(type="str", aliases=["db"]),
        connect_timeout=dict(type="int", default=10),
    )
