"""AtomicCheckpointIO: a checkpoint appears whole or not at all; a failed write keeps the old one."""

from __future__ import annotations

import os

import pytest
import torch

import zoo.components.train.checkpoint as checkpoint_module
from zoo.components.train.checkpoint import AtomicCheckpointIO


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
