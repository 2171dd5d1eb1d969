"""TrainingRandomState: the global random state survives a checkpoint and validation does not shift it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoo.components.train.random_state import TrainingRandomState, collect_random_state, restore_random_state


def draws() -> tuple[list[float], float, float, float]:
    return torch.rand(3).tolist(), float(np.random.rand()), float(np.random.standard_normal()), random.gauss(0, 1)


def test_a_saved_state_loads_weights_only_and_restores_torch_numpy_and_python(tmp_path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    draws()  # leaves a cached Gaussian in numpy and in random
    torch.save(collect_random_state(), tmp_path / "state.pt")
    expected = draws()
    draws()
    restore_random_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert draws() == expected


class Noisy(LightningModule):
    """Trains on noise from the global generators; validation draws too (as a resumed run would not)."""

    def __init__(self, pinned: bool) -> None:
        super().__init__()
        self.pinned = pinned
        self.weight = nn.Parameter(torch.zeros(3))
        self.noise: dict[int, tuple] = {}

    def training_step(self, batch, batch_idx):
        self.noise[self.global_step] = draws()
        return (self.weight - torch.tensor(self.noise[self.global_step][0])).pow(2).sum()

    def validation_step(self, batch, batch_idx) -> None:
        draws()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_callbacks(self):
        return [TrainingRandomState()] if self.pinned else []

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(16, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def fit(module: Noisy, max_steps: int, folder, ckpt_path=None, validate: bool = True) -> Noisy:
    seed_everything(0, verbose=False)
    trainer = Trainer(max_steps=max_steps, val_check_interval=2, limit_val_batches=int(validate),
                      num_sanity_val_steps=0, logger=False,
                      callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True)],
                      accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("pinned", [True, False])
def test_a_resumed_run_draws_what_an_uninterrupted_one_draws(tmp_path, pinned: bool) -> None:
    uninterrupted = fit(Noisy(pinned), 7, tmp_path / "whole").noise
    # Stopped after step 4, whose checkpoint is written before the validation that follows that step (which
    # the resumed run skips) and after which seed_everything starts the generators anew.
    fit(Noisy(pinned), 4, tmp_path / "part")
    resumed = fit(Noisy(pinned), 7, tmp_path / "part", tmp_path / "part" / "last.ckpt").noise
    assert sorted(resumed) == [4, 5, 6]
    same = all(resumed[step] == uninterrupted[step] for step in resumed)
    assert same == pinned  # without the callback the draws differ: the test can tell
    # Pinned between steps, training draws the same with validation (after steps 1, 3, 5) as without.
    assert (fit(Noisy(pinned), 7, tmp_path / "noval", validate=False).noise == uninterrupted) == pinned
