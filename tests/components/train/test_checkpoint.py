"""AtomicCheckpointIO: a checkpoint appears whole or not at all; a failed write keeps the old one."""

from __future__ import annotations

import os

import pytest
import torch

import zoo.components.train.checkpoint as checkpoint_module
from zoo.components.train.checkpoint import AtomicCheckpointIO, find_last_checkpoint


def test_writes_a_readable_checkpoint_with_umask_permissions(tmp_path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 5}, path)
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 5
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_write_that_dies_keeps_the_previous_checkpoint_and_no_partial(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    def dies_halfway(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 1


def test_last_means_the_newest_last_checkpoint_of_any_earlier_run(tmp_path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def new_trainer() -> Trainer:
        return Trainer(logger=CSVLogger(tmp_path, name="lightning_logs"), callbacks=[ModelCheckpoint(save_last=True)],
                       accelerator="cpu", devices=1)

    assert find_last_checkpoint(new_trainer()) is None
    paths = [tmp_path / "lightning_logs" / version / "checkpoints" / "last.ckpt" for version in ("version_1",
                                                                                                "version_0")]
    for age, path in enumerate(paths):  # version_0's is the newer one: the run resumed in place and wrote last
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        (path.parent / "epoch=0-step=1.ckpt").write_bytes(b"")
        os.utime(path, (1e9 + age, 1e9 + age))
    # The new run's own folder is version_2, where Lightning alone would look.
    assert find_last_checkpoint(new_trainer()) == paths[1]
    # Runs of another model (another recipe logging to the same folder) are not resumed.
    (paths[1].parents[1] / "config.yaml").write_text("model:\n  class_path: zoo.pssr.module.PSSRModule\n")
    (paths[0].parents[1] / "config.yaml").write_text("model:\n  class_path: zoo.osdiffvsr.module.OSDiffVSRModule\n")
    assert find_last_checkpoint(new_trainer(), "zoo.osdiffvsr.module.OSDiffVSRModule") == paths[0]
    assert find_last_checkpoint(new_trainer(), "zoo.stream_diffvsr.module.StreamDiffVSRModule") is None
