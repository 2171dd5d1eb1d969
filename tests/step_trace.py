"""`StepTrace`, the callback tests/test_recipes.py adds to tiny recipe runs (`--trainer.callbacks+=...`).

It writes one JSON line per training step with what the step saw: stage, trainable parameters, optimizer
and LR-scheduler state, the batch's clips and the loss. With `hold_at` it stops the process before the
step of that number, after the checkpoint of the step before was written, and waits for the test to kill it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _optimizer_digest(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    # The sum of every state tensor, in float64: exact equality of two runs' sums is what the test asks.
    total = sum(float(value.double().sum()) for state in optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor))
    return {"lr": [group["lr"] for group in optimizer.param_groups],
            "params": [len(group["params"]) for group in optimizer.param_groups], "state": total}


class StepTrace(Callback):
    """Writes each training step's record to `path` (JSON lines).

    Args:
        path: the file to append to.
        hold_at: the global step before which the process stops and waits to be killed; None runs through.
    """

    def __init__(self, path: str, hold_at: int | None = None) -> None:
        self.path, self.hold_at = Path(path), hold_at
        self.record: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.hold_at:
            self.path.with_suffix(".held").write_text(str(os.getpid()))
            time.sleep(600)  # the test sends SIGKILL now
            raise RuntimeError(f"process held at step {self.hold_at} was not killed")
        trainable = sorted(name for name, p in pl_module.named_parameters() if p.requires_grad)
        self.record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "stage": pl_module.stage.name,
            "trainable": hashlib.sha1("\n".join(trainable).encode()).hexdigest(),
            "keys": list(batch["key"]),
            "optimizers": [_optimizer_digest(optimizer) for optimizer in trainer.optimizers],
            "schedulers": [{k: v for k, v in config.scheduler.state_dict().items() if k in ("last_epoch", "_last_lr")}
                           for config in trainer.lr_scheduler_configs],
        }

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.record["loss"] = float(trainer.callback_metrics["train/loss"])
        with self.path.open("a") as file:
            file.write(json.dumps(self.record) + "\n")
