"""Writing a file so that no reader (and no crash) ever sees it half-written: the one way this package does it.

The content goes to a temporary file in the same folder (``mkstemp``: mode 0600, a name no one else uses), is
flushed to disk, and is renamed over the target; on any failure the temporary file is removed and the target is
untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def write_atomic(path: str | os.PathLike[str], content: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``content`` (bytes, or a function that writes into the open binary file) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], content: Any) -> Path:
    """``content`` as JSON (indented by 4, as nnU-Net writes its JSON files) to ``path`` atomically."""
    return write_atomic(path, json.dumps(content, indent=4, sort_keys=False).encode())
