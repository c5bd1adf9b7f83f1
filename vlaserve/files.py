"""Files that other processes read while this one writes them."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, data: bytes | str) -> None:
    """``data`` written to ``path`` whole: into a file of this process's own beside it, then renamed over it,
    so that a reader finds the old content or the new, never a part, and processes writing the same path side
    by side do not mix their bytes."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        partial.write_text(data)
    else:
        partial.write_bytes(data)
    partial.replace(path)
