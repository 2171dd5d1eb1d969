"""OSDEnhancer data: per-stage sources, clips and crops, the three dataset layouts, per-batch temporal skips
with RealBasicVSR LR, and loaders that end with their stage."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.components.train.data import VideoClipDataset
from zoo.components.video_io import write_video
from zoo.osdenhancer.callbacks import OSDEnhancerStages
from zoo.osdenhancer.data import STAGE_DATA, OSDEnhancerDataModule, StageData, StillImageDataset

SMALL = {
    "decoder": StageData(("hq_video",), 9, (32, 32), degrade=False),
    "adaptation": StageData(("hq_video",), 9, (32, 48)),
    "temporal": StageData(("hfr_video",), 9, (32, 32), (0, 1, 3, 7)),
    "spatial": StageData(("hq_video", "image"), 9, (32, 32), (0, 1)),
}


def _fake_trainer(global_step: int, training: bool = True) -> SimpleNamespace:
    schedule = OSDEnhancerStages(decoder_steps=2, adaptation_steps=2, temporal_steps=2, spatial_steps=2)
    return SimpleNamespace(training=training, global_step=global_step, callbacks=[schedule], world_size=1,
                           global_rank=0)


def _batch(data: OSDEnhancerDataModule, stage: str, size: int = 2) -> dict:
    dataset = data.stage_dataset(stage)
    items = [dataset[i] for i in range(size)]
    return {"hr": torch.stack([item["hr"] for item in items]), "key": [item["key"] for item in items],
            "stage": [item["stage"] for item in items]}


def test_paper_stage_data() -> None:
    assert STAGE_DATA["decoder"] == StageData(("hq_video",), 33, (256, 256), (0,), degrade=False)
    assert STAGE_DATA["adaptation"] == StageData(("hq_video",), 33, (320, 640), (0,))
    assert STAGE_DATA["temporal"] == StageData(("hfr_video",), 33, (320, 640), (0, 1, 3, 7, 15))
    assert STAGE_DATA["spatial"] == StageData(("hq_video", "image"), 9, (320, 320), (0, 1))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sources": ("div2k",), "clip_length": 9, "crop": (32, 32)}, "sources must be some of"),
    ({"sources": ("image",), "clip_length": 8, "crop": (32, 32)}, r"clip_length must be 8n \+ 1"),
    ({"sources": ("image",), "clip_length": 9, "crop": (30, 32)}, "crop multiples of 16"),
    ({"sources": ("image",), "clip_length": 9, "crop": (32, 32), "temporal_skips": (2,)}, "multiple of skip"),
])
def test_stage_data_is_validated(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        StageData(**kwargs)


def test_offline_every_stage_reads_the_sample_clips() -> None:
    data = OSDEnhancerDataModule(stages=SMALL, batch_size=1, num_workers=0)
    for stage, expected in (("decoder", (9, 3, 32, 32)), ("adaptation", (9, 3, 32, 48)), ("temporal", (9, 3, 32, 32))):
        item = data.stage_dataset(stage)[0]
        assert item["hr"].shape == expected and item["stage"] == stage
    spatial = data.stage_dataset("spatial")
    video, still = spatial[0]["hr"], spatial[1]["hr"]  # sources alternate 1:1
    assert not torch.equal(video[0], video[-1])
    assert torch.equal(still, still[:1].expand_as(still))  # an image repeated into a still clip


def test_batches_draw_one_temporal_skip_and_degrade_its_key_frames() -> None:
    data = OSDEnhancerDataModule(stages=SMALL, batch_size=2, num_workers=0)
    data.trainer = _fake_trainer(global_step=4)  # in "temporal"
    for step in (4, 5):
        data.trainer.global_step = step
        batch = data.on_after_batch_transfer(_batch(data, "temporal"), 0)
        scale = batch["temporal_scale"]
        assert scale - 1 in SMALL["temporal"].temporal_skips
        assert batch["lr"].shape == (2, (9 - 1) // scale + 1, 3, 8, 8)  # RealBasicVSR x4 of the key frames
    data.trainer.global_step = 0  # "decoder": HR only
    batch = data.on_after_batch_transfer(_batch(data, "decoder"), 0)
    assert "lr" not in batch and batch["temporal_scale"] == 1


def test_a_batch_of_another_stage_is_refused() -> None:
    data = OSDEnhancerDataModule(stages=SMALL, batch_size=1, num_workers=0)
    data.trainer = _fake_trainer(global_step=2)  # "adaptation" has started
    with pytest.raises(RuntimeError, match="reload_dataloaders_every_n_epochs"):
        data.on_after_batch_transfer(_batch(data, "decoder", 1), 0)


def test_a_loader_covers_its_stage_and_a_resumed_one_the_rest() -> None:
    data = OSDEnhancerDataModule(stages=SMALL, batch_size=2, num_workers=0)
    data.trainer = _fake_trainer(global_step=3)  # "adaptation" is steps 2 and 3
    batches = list(data.train_dataloader())
    assert len(batches) == 2 and all(batch["stage"] == ["adaptation"] * 2 for batch in batches)
    assert batches[0]["hr"].shape == (2, 9, 3, 32, 48)
    # A checkpoint written after the stage's first step: the resumed loader yields the second batch only.
    interrupted = data.train_dataloader()
    next(iter(interrupted))
    resumed = data.train_dataloader()
    resumed.load_state_dict(interrupted.state_dict())
    (rest,) = list(resumed)
    assert rest["key"] == batches[1]["key"]
    data.trainer = None
    with pytest.raises(RuntimeError, match="needs one StageSchedule"):
        data.train_dataloader()


def _write_frames(folder: Path, count: int, size: tuple[int, int], seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def test_the_three_source_layouts_are_read(tmp_path: Path) -> None:
    # HQ-VSR: frame folders and video files in one root; Adobe240: frame folders; DIV2K: a folder of images.
    _write_frames(tmp_path / "hqvsr" / "seq_a", 9, (40, 56), 0)
    write_video(tmp_path / "hqvsr" / "clip_b.mp4", torch.rand(10, 3, 48, 64), fps=24)
    _write_frames(tmp_path / "adobe240" / "GOPR9633", 12, (36, 40), 1)
    _write_frames(tmp_path / "div2k", 3, (50, 60), 2)
    data = OSDEnhancerDataModule(hq_video_roots=[str(tmp_path / "hqvsr")],
                                 hfr_video_roots=[str(tmp_path / "adobe240")], image_roots=[str(tmp_path / "div2k")],
                                 stages=SMALL, batch_size=1, num_workers=0)
    hq = data.stage_dataset("decoder").sources[0]
    assert isinstance(hq, VideoClipDataset) and {s.key for s in hq.sequences} == {"seq_a", "clip_b"}
    hfr = data.stage_dataset("temporal")
    assert hfr.sources[0].sequences[0].key == "GOPR9633" and len(hfr) == 12 - 9 + 1
    spatial = data.stage_dataset("spatial")
    assert isinstance(spatial.sources[1], StillImageDataset) and len(spatial.sources[1]) == 3
    assert spatial[1]["hr"].shape == (9, 3, 32, 32)
    assert spatial[0]["hr"].shape == (9, 3, 32, 32)


def test_validation_clips_carry_their_temporal_scale() -> None:
    data = OSDEnhancerDataModule(stages=SMALL, val_clip_length=9, val_size=32, val_temporal_skip=1, num_workers=0)
    data.setup("validate")
    data.trainer = _fake_trainer(global_step=0, training=False)
    batch = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)
    assert batch["temporal_scale"] == 2 and batch["lr"].shape == (1, 5, 3, 8, 8) and batch["hr"].shape[1] == 9
