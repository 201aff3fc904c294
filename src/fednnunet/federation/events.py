"""Progress events of a running job, appended as JSON lines so the launcher (or a person) can follow them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EventLog:
    """Appends ``{"t": ..., "kind": ..., "message": ..., **data}`` lines to ``path`` and logs the message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, message: str, **data: Any) -> None:
        logger.info(message)
        with self.path.open("a") as f:
            f.write(json.dumps({"t": time.time(), "kind": kind, "message": message, **data}) + "\n")

    def info(self, message: str) -> None:
        self.emit("info", message)
