# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Files slipway's modules write whole: the one atomic write (standard library only; runs with
the target's Python)."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os


def atomic_write(path, text, mode=0o600, tmp=None):
    """Replace ``path`` with ``text`` atomically: a temporary file (``tmp``, default
    ``<path>.tmp.<pid>``) in the same directory, created with ``mode``, written, fsynced and renamed
    over ``path``; on any failure the temporary file is removed and ``path`` is as it was."""
    tmp = tmp or "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
