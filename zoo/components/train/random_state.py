"""The random state of training, pinned between steps and saved in checkpoints, so a resumed run draws as an
uninterrupted one.

Lightning checkpoints weights, optimizers, schedulers, loops and callbacks, but not the global random
generators (torch, CUDA, numpy, Python's `random`) that training steps draw noise, timesteps and crops
from. A resumed run would start them from `seed_everything` again. `TrainingRandomState` records them
after each training step, restores them before the next one and saves them in checkpoints, once per
process. Restoring before every step also keeps out what runs between steps and differs between an
uninterrupted and a resumed run: validation (which a run resumed from a checkpoint written right before
it skips), the sanity check, building loaders and models. Every `ZooModule` adds it
(`ZooModule.configure_callbacks`).

The datasets, samplers and degradations draw from generators of their own, seeded per item, epoch and
step (`zoo.components.train.data`); their place in an epoch is the loader's state (`ResumableDataLoader`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn


def collect_random_state() -> dict[str, Any]:
    """The global generators' states as tensors, lists and numbers (what `torch.load(weights_only=True)` reads)."""
    numpy_state = np.random.get_state(legacy=False)
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def restore_random_state(state: dict[str, Any]) -> None:
    """Set the global generators to a state of `collect_random_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


class TrainingRandomState(Callback):
    """Pins the global random state between training steps and checkpoints it per process.

    After a step it records the state; before the next it restores that state, so a step draws only what
    the steps before it left. A checkpoint holds every process's recorded state (gathered when several
    processes train: each draws its own noise), and a resumed run restores its process's before its first
    step. Resumed on another number of processes, the states cannot be matched and training goes on from
    the freshly seeded ones, with a warning.
    """

    def __init__(self) -> None:
        self._trainer: Trainer | None = None
        self._pinned: dict[str, Any] | None = None
        self._loaded: list[dict[str, Any]] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            if len(loaded) == trainer.world_size:
                self._pinned = loaded[trainer.global_rank]
            else:
                rank_zero_warn(f"the checkpoint holds the random state of {len(loaded)} process(es), this run has "
                               f"{trainer.world_size}: random draws continue from the seed, not as the first run's")
        if self._pinned is not None:
            restore_random_state(self._pinned)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pinned = collect_random_state()

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds a checkpoint's content on every process (only rank 0 writes it), so all meet here.
        state = self._pinned if self._pinned is not None else collect_random_state()
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return {"processes": [state]}
        states: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, state)
        return {"processes": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied before the first step rather than now: setting up the run draws from the generators too.
        self._loaded = state_dict["processes"]
