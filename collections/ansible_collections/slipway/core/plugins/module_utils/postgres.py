# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""The one door to PostgreSQL: the connection options every slipway PostgreSQL module takes
(documented in doc_fragments/postgres.py), what they mean to psycopg and to the client programs
(``psql``, ``pg_dump``, ``pg_restore``), and the connection itself.

The password never reaches a command line: a client program gets it as ``PGPASSWORD`` in its own
environment (``client_env``), psycopg as a keyword (``connect_params``).
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import sys

from ansible_collections.slipway.core.plugins.module_utils.oneline import one_line
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

APPLICATION_NAME = "slipway"


class ConnectError(Exception):
    """A one-line connection failure (no password in it) naming the fix."""


def postgres_argument_spec():
    return dict(
        login_host=dict(type="str"),
        login_port=dict(type="int", default=5432),
        login_user=dict(type="str"),
        login_password=dict(type="str", no_log=True),
        login_db=dict(type="str", aliases=["db"]),
        connect_timeout=dict(type="int", default=10),
    )


def secrets(params, dsn=None):
    """The secrets the login options (and ``dsn``) hold, for redacting messages."""
    return [s for s in (params.get("login_password"), dsn_password(dsn)) if s]


# -- psycopg -------------------------------------------------------------------------------------
def _psycopg():
    """The psycopg module, or None when it is not installed (imported only by who connects: the
    modules that run client programs need not have it)."""
    try:
        import psycopg
        import psycopg.conninfo  # noqa: F401 - dsn_password reads it
    except ImportError:
        return None
    return psycopg


def connect_params(params, dsn=None):
    """psycopg/libpq keywords of the login options, combined with ``dsn`` by ``connect``. The
    default ``login_port`` counts only with ``login_host`` or without a DSN, so it never overrides
    the DSN's own port."""
    return dict(
        host=params.get("login_host"),
        port=params.get("login_port") if (params.get("login_host") or not dsn) else None,
        user=params.get("login_user"),
        password=params.get("login_password"),
        dbname=params.get("login_db"),
    )


def connect(dsn=None, connect_timeout=10, **params):
    """A psycopg connection (autocommit) from a DSN/URL and/or libpq keywords (unset ones are
    left out); application_name is ``slipway``. Raises ConnectError, one line without the password."""
    psycopg = _psycopg()
    if psycopg is None:
        raise ConnectError("psycopg 3 is not installed for %s; pip install 'psycopg[binary]'" % (sys.executable or "python"))
    kwargs = dict((k, v) for k, v in params.items() if v not in (None, ""))
    kwargs.setdefault("application_name", APPLICATION_NAME)
    try:
        return psycopg.connect(dsn or "", autocommit=True, connect_timeout=connect_timeout, **kwargs)
    except psycopg.Error as exc:
        message = redact_text(one_line(str(exc)) or type(exc).__name__, known=(kwargs.get("password"), dsn_password(dsn)))
        raise ConnectError("cannot connect to PostgreSQL: %s; check the DSN, the server and pg_hba.conf" % message)


def dsn_password(dsn):
    """The password inside a DSN/URL (to mask it in messages), or None."""
    psycopg = _psycopg() if dsn else None
    if psycopg is None:
        return None
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return None


# -- client programs -------------------------------------------------------------------------------
def client_argv(program, params, options=(), tail=(), no_password=False):
    """``program``'s command line: ``options``, ``--no-password`` (never prompt), the login options
    as ``-h``/``-p``/``-U``, ``-d <login_db>``, then ``tail``. Never the password."""
    argv = [program] + list(options)
    if no_password:
        argv.append("--no-password")
    if params.get("login_host"):
        argv += ["-h", params["login_host"]]
    if params.get("login_port"):
        argv += ["-p", str(params["login_port"])]
    if params.get("login_user"):
        argv += ["-U", params["login_user"]]
    if params.get("login_db"):
        argv += ["-d", params["login_db"]]
    return argv + list(tail)


def client_env(params, base=None, connect_timeout=None):
    """The environment of a client program: a copy of ``base`` without any inherited
    ``PGPASSWORD``, the login password as ``PGPASSWORD`` (the only way it reaches the program) and
    ``PGCONNECT_TIMEOUT`` (``connect_timeout``, default the option's)."""
    env = dict(base or {})
    env.pop("PGPASSWORD", None)
    if params.get("login_password"):
        env["PGPASSWORD"] = params["login_password"]
    env["PGCONNECT_TIMEOUT"] = str(params["connect_timeout"] if connect_timeout is None else connect_timeout)
    return env


def where(params):
    """``host:port/db`` of the login options, for messages."""
    return "%s:%s/%s" % (params.get("login_host") or "local socket", params.get("login_port"), params.get("login_db"))
