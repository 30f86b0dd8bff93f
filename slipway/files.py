"""Writing files that may hold secrets: atomically, created with their final mode."""
from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path


def write_private(path: Path, content: str | bytes, mode: int = 0o600, owner: pwd.struct_passwd | None = None) -> bool:
    """Write ``content`` to ``path`` atomically, the file created with ``mode`` (never wider) and
    ``owner``. Returns False, writing nothing, when the file already has this content and mode."""
    data = content.encode() if isinstance(content, str) else content
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True
