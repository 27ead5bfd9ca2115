"""One rule for every file cl-plugin writes.

An existing file is overwritten, and one log line on the ``cl_plugin`` logger
says which (so earlier results are never replaced without a word). The new
content goes to a temporary file in the same folder first and is renamed over
the target only when it is complete, so a crash or a full disk never leaves
half a file where a good one was.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "logger"]

logger = logging.getLogger("cl_plugin")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, rename it over ``path``.

    The parent folder is created if needed. If ``path`` already exists, a
    warning is logged before it is replaced. On error the temporary file is
    removed and ``path`` is left as it was.

    Example::

        with atomic_output("results/results.json") as tmp:
            tmp.write_text(json.dumps(results))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if target.exists():
            logger.warning("cl-plugin: overwriting existing file %s", target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
