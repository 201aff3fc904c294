"""Plain identifiers: the one rule for names that become file names, folder names or log keys.

Why one rule: site names (``tls/sites/NAME.pub``, the client's log folders) and the names a training builds its
folders from (trainer, plans, configuration; also when a site's reply states them) must never carry a path
separator or ``..``; checking them in one place keeps both sides of the federation on the same rule.
"""

from __future__ import annotations

import re
from typing import Any

_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_identifier(value: Any, what: str, max_len: int = 200) -> str:
    """``value`` if it is a plain identifier (letters, digits, ``_ . -``; starting with a letter or digit; no
    ``..``; at most ``max_len`` characters) that is safe in a file name; ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(value, str) or len(value) > max_len or not _IDENTIFIER.match(value) or ".." in value:
        text = repr(value)
        raise ValueError(f"{what} must be a plain name (letters, digits, '_', '.', '-'; starting with a letter or "
                         f"digit; no '..'; at most {max_len} characters), got "
                         f"{text if len(text) <= 60 else text[:57] + '...'}")
    return value
