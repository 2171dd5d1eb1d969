"""Checkpoints that are either complete or absent, whatever kills the writer.

Lightning's default writer goes through an fsspec transaction whose temporary file lives in the
system temp folder: when that is another filesystem (a tmpfs, a node-local disk), the final move is a
copy, and a job killed during it leaves a truncated `last.ckpt` that `--ckpt_path last` then fails on.
`AtomicCheckpointIO` writes beside the target, flushes to disk, and renames over it in one step.
Every recipe names it in `trainer.plugins`. `find_last_checkpoint` is what `lightning fit --ckpt_path last`
resumes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


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


def find_last_checkpoint(trainer: Trainer, model_class_path: str | None = None) -> Path | None:
    """The newest `last` checkpoint any earlier run of this trainer's setup wrote, or None.

    What `--ckpt_path last` should resume. Lightning looks only in this run's checkpoint folder, which with a
    versioned logger (the recipes' CSVLogger) is a new, empty `lightning_logs/version_N/checkpoints`; the
    earlier runs' checkpoints are in their own version folders beside it.

    Args:
        trainer: the trainer about to fit.
        model_class_path: the LightningModule's `module.Class`; runs of another model (every recipe logs to
            ./lightning_logs) are left out when their folder's `config.yaml` (written by `lightning fit`) names
            another one.
    """
    found: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        pattern = f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}"
        if callback.dirpath is not None:
            found += Path(callback.dirpath).glob(pattern)
        elif trainer.loggers and trainer.loggers[0].root_dir is not None:
            runs = Path(trainer.loggers[0].root_dir).glob(f"*/checkpoints/{pattern}")
            found += [path for path in runs if _trains(path.parents[1] / "config.yaml", model_class_path)]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def _trains(config: Path, model_class_path: str | None) -> bool:
    """Whether the run that wrote `config` trained `model_class_path` (True when either is unknown)."""
    if model_class_path is None or not config.is_file():
        return True
    model = (yaml.safe_load(config.read_text()) or {}).get("model")
    return not isinstance(model, dict) or model.get("class_path") == model_class_path
