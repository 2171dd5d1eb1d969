"""Checkpoints that are either complete or absent, whatever kills the writer.

Lightning's default writer goes through an fsspec transaction whose temporary file lives in the
system temp folder: when that is another filesystem (a tmpfs, a node-local disk), the final move is a
copy, and a job killed during it leaves a truncated `last.ckpt` that `--ckpt_path last` then fails on.
`AtomicCheckpointIO` writes beside the target, flushes to disk, and renames over it in one step.
Every recipe names it in `trainer.plugins`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose files appear in one rename, after their bytes reached the disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            # mkstemp files are private (0600); a checkpoint gets the mode open() would give it.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o666 & ~umask)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
