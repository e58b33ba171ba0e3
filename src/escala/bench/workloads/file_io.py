"""file-io: write a file with an fsync after each chunk, read it back; the waits release the GIL.

On this project's reference machine (a VM on ext4) one fsync costs about 0.1–0.2 ms, and a
task that wrote 1 MiB with a single fsync spent about half its wall time on the CPU (copying
pages in the kernel). Sixteen fsyncs per file, one after each 64 KiB chunk, bring the CPU
share down to about a third, as with a database committing a transaction per write; on a
laptop SSD, where an fsync costs milliseconds, waiting dominates by far more.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import Prepared, Workload, scaled

__all__ = ["FileIO", "write_read"]

_TASKS = 240
_CHUNK = 64 << 10
_CHUNKS = 16  # 1 MiB per file


def write_read(path: str) -> int:
    """Write 1 MiB to ``path`` with an fsync after each chunk, read it back, return its size.

    The file is removed afterwards, so a run never holds more than one file per worker.
    """
    chunk = bytes([len(path) % 256]) * _CHUNK
    with open(path, "wb") as out:
        for _ in range(_CHUNKS):
            out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # waits for the disk without the GIL
    with open(path, "rb") as back:
        size = len(back.read())
    os.remove(path)
    return size


class FileIO(Workload):
    name = "file-io"
    title = "Disk writes with fsync"
    expected = "threads"
    explanation = (
        "Writes, reads and fsync waits happen in the kernel without the GIL, so threads "
        "overlap them; processes pay their start-up for the same overlap."
    )

    @contextmanager
    def prepared(self, scale: float = 1.0) -> Iterator[Prepared]:
        tasks = scaled(_TASKS, scale, least=2)
        folder = Path(tempfile.mkdtemp(prefix="escala-bench-"))
        try:
            yield Prepared(write_read, [str(folder / f"task-{i:05d}.bin") for i in range(tasks)])
        finally:
            shutil.rmtree(folder)
