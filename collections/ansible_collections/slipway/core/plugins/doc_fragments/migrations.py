# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """Options of slipway's modules that read drizzle's migration history (module_utils/migrate.py's
    engine): the tracking table (DOCUMENTATION: pg_migrations, pg_drift, app_state) and how a plan is
    made (PLAN: pg_migrations, app_preflight)."""

    DOCUMENTATION = r"""
options:
  tracking_schema:
    description: Schema of drizzle's tracking table (drizzle's C(migrationsSchema)).
    type: str
    default: drizzle
  tracking_table:
    description: drizzle's tracking table (drizzle's C(migrationsTable)).
    type: str
    default: __drizzle_migrations
"""

    PLAN = r"""
options:
  include_skipped:
    description: Apply skipped migrations too, in journal order; without it their presence fails the task.
    type: bool
    default: false
  allow_tampered:
    description: Accept files edited after they were applied (treated as applied); without it they fail the task.
    type: bool
    default: false
  allow_unknown:
    description: Accept tracking rows that match no file; without it they fail the task.
    type: bool
    default: false
  rehearse:
    description: In a plan (check mode), rehearse the pending set in a transaction that is rolled back.
    type: bool
    default: true
  lock_timeout:
    description: PostgreSQL C(lock_timeout) for the rehearsal and the apply (a busy table fails fast instead of queueing
      the app behind a lock).
    type: str
    default: 5s
  mode:
    description: C(online) (lock-safe index builds, short lock timeouts with retries) or C(transaction) (drizzle's one
      transaction).
    type: str
    choices: [online, transaction]
    default: online
  online_min_rows:
    description: In online mode, tables with fewer rows (planner estimate) get their indexes built in the transaction.
    type: int
    default: 10000
  online_lock_timeout:
    description: In online mode, the C(lock_timeout) of each transaction; a lock not granted in time rolls it back and
      retries.
    type: str
    default: 20ms
"""
