"""Temporal subsampling, dataset layouts, the base DataModule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from zoo.components.samples import SAMPLE_CLIP_NAMES, sample_clips
from zoo.components.train.data import (
    EpochShuffleSampler,
    LRVideoDataset,
    PairedVideoDataset,
    ResumableDataLoader,
    SampleClipDataset,
    VideoClipDataset,
    VSRDataModule,
    temporal_subsample,
)
from zoo.components.train.degradation import BicubicDegradation
from zoo.components.video_io import probe_video, write_video

SHARED_CLIPS = Path(__file__).resolve().parents[3] / ".." / "shared" / "clips"


# Temporal subsampling ---------------------------------------------------------------------------


def test_temporal_subsample_nine_frames_skip_three():
    keys, interp = temporal_subsample(9, 3)
    assert keys.tolist() == [0, 4, 8]
    assert interp.tolist() == [1, 2, 3, 5, 6, 7]


@pytest.mark.parametrize(
    ("skip", "keys"),
    [(0, list(range(17))), (1, list(range(0, 17, 2))), (3, [0, 4, 8, 12, 16]), (7, [0, 8, 16]), (15, [0, 16])],
)
def test_temporal_subsample_paper_skips(skip, keys):
    key_frames, interp_frames = temporal_subsample(17, skip)
    assert key_frames.tolist() == keys
    assert sorted(key_frames.tolist() + interp_frames.tolist()) == list(range(17))


def test_temporal_subsample_rejects_unaligned_length():
    with pytest.raises(ValueError, match="num_frames=8, skip=3"):
        temporal_subsample(8, 3)


# Dataset layouts --------------------------------------------------------------------------------


def write_frames(folder: Path, num_frames: int, size: tuple[int, int] = (16, 16), names: str = "{:08d}.png"):
    """Frames whose pixels say what they are: R = 10 * frame index, G = 8 * row, B = 8 * column."""
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    rows = torch.arange(height).view(height, 1).expand(height, width)
    cols = torch.arange(width).view(1, width).expand(height, width)
    for index in range(num_frames):
        image = torch.stack([torch.full_like(rows, 10 * index), 8 * rows, 8 * cols]).to(torch.uint8)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / names.format(index))


def frame_indices(clip: torch.Tensor) -> list[int]:
    return [round(v) for v in (clip[:, 0, 0, 0] * 255 / 10).tolist()]


def test_reds_layout_windows_and_stride(tmp_path):
    write_frames(tmp_path / "000", 5)
    write_frames(tmp_path / "001", 5)
    dataset = VideoClipDataset(tmp_path, clip_length=3, flip=False, temporal_reverse=False, layout="reds")
    assert len(dataset) == 6
    item = dataset[4]
    assert item["key"] == "001/00000001"
    assert item["hr"].shape == (3, 3, 16, 16) and item["hr"].dtype == torch.float32
    assert frame_indices(item["hr"]) == [1, 2, 3]
    strided = VideoClipDataset(tmp_path, clip_length=3, stride=2, flip=False, temporal_reverse=False)
    assert len(strided) == 2
    assert frame_indices(strided[1]["hr"]) == [0, 2, 4]
    with pytest.raises(IndexError):
        dataset[6]


def test_exclude_leaves_sequences_out_and_frame_index_follows_reversal(tmp_path):
    for key in ("000", "001", "011"):
        write_frames(tmp_path / key, 4)
    dataset = VideoClipDataset(tmp_path, clip_length=3, flip=False, exclude=["000", "011"])
    assert [s.key for s in dataset.sequences] == ["001"] and len(dataset) == 2
    # frame_index names the frames the clip holds, in its order: reversed clips reverse it too.
    orders = {tuple(dataset[i]["frame_index"].tolist()): frame_indices(dataset[i]["hr"]) for i in range(2)}
    assert all(list(index) == frames for index, frames in orders.items())
    strided = VideoClipDataset(tmp_path, clip_length=2, stride=3, flip=False, temporal_reverse=False)
    assert strided[0]["frame_index"].tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"exclude names sequences \['020'\]"):
        VideoClipDataset(tmp_path, clip_length=3, exclude=["020"])


def test_random_crop_is_one_window_for_all_frames_and_reproducible(tmp_path):
    write_frames(tmp_path / "000", 6)
    make = lambda seed: VideoClipDataset(tmp_path, clip_length=3, crop_size=(8, 6), seed=seed)  # noqa: E731
    dataset = make(0)
    item = dataset[2]
    assert item["hr"].shape == (3, 3, 8, 6)
    # One crop window (and one flip) for the whole clip: G and B planes agree across frames.
    assert torch.equal(item["hr"][0, 1:], item["hr"][1, 1:]) and torch.equal(item["hr"][0, 1:], item["hr"][2, 1:])
    assert torch.equal(make(0)[2]["hr"], item["hr"])  # same seed, index and epoch: same clip
    draws = lambda d: torch.stack([d[i]["hr"] for i in range(len(d))])  # noqa: E731
    assert not torch.equal(draws(make(1)), draws(dataset))
    dataset.set_epoch(1)
    assert not torch.equal(draws(dataset), draws(make(0)))


def test_flips_and_reverse_are_applied(tmp_path):
    write_frames(tmp_path / "000", 12)
    dataset = VideoClipDataset(tmp_path, clip_length=3)
    plain = VideoClipDataset(tmp_path, clip_length=3, flip=False, temporal_reverse=False)
    seen = set()
    for index in range(len(dataset)):
        hr, reference = dataset[index]["hr"], plain[index]["hr"]
        horizontal = torch.equal(hr[:, 2], reference.flip(0, -1)[:, 2]) or torch.equal(
            hr[:, 2], reference.flip(-1)[:, 2]
        )
        vertical = torch.equal(hr[:, 1], reference.flip(-2)[:, 1]) or torch.equal(hr[:, 1], reference.flip(0, -2)[:, 1])
        reversed_ = frame_indices(hr) == frame_indices(reference)[::-1]
        seen.add((horizontal, vertical, reversed_))
    assert len({s[0] for s in seen}) == 2 and len({s[1] for s in seen}) == 2 and len({s[2] for s in seen}) == 2


def test_crop_larger_than_frames_is_an_error(tmp_path):
    write_frames(tmp_path / "000", 3)
    with pytest.raises(ValueError, match="000: frames are 16x16, smaller than crop_size 32x32"):
        VideoClipDataset(tmp_path, clip_length=2, crop_size=32)[0]


def test_vimeo90k_layout_with_list_and_natural_order(tmp_path):
    write_frames(tmp_path / "sequences" / "00001" / "0001", 7, names="im{}.png")
    write_frames(tmp_path / "sequences" / "00001" / "0002", 11, names="im{}.png")
    write_frames(tmp_path / "sequences" / "00002" / "0001", 7, names="im{}.png")
    (tmp_path / "sep_trainlist.txt").write_text("00001/0002\n00002/0001\n")
    everything = VideoClipDataset(tmp_path, clip_length=7, flip=False, temporal_reverse=False)  # auto
    assert [s.key for s in everything.sequences] == ["00001/0001", "00001/0002", "00002/0001"]
    listed = VideoClipDataset(
        tmp_path,
        clip_length=11,
        flip=False,
        temporal_reverse=False,
        layout="vimeo90k",
        sequence_list="sep_trainlist.txt",
    )
    assert len(listed) == 1  # only 00001/0002 has 11 frames
    assert frame_indices(listed[0]["hr"]) == list(range(11))  # im2 before im10
    (tmp_path / "sep_testlist.txt").write_text("00009/0001\n")
    with pytest.raises(ValueError, match=r"sequences \['00009/0001'\] from sep_testlist.txt hold no frames"):
        VideoClipDataset(tmp_path, clip_length=2, sequence_list="sep_testlist.txt")


def test_youhq_layout_mixes_frame_folders_and_videos(tmp_path):
    write_frames(tmp_path / "clip_a", 4)
    frames = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    write_video(tmp_path / "clip_b.mp4", frames, fps=24)
    dataset = VideoClipDataset(tmp_path, clip_length=3, crop_size=8, layout="youhq")
    assert [s.key for s in dataset.sequences] == ["clip_a", "clip_b"]
    assert len(dataset) == 2 + 4
    item = dataset[5]
    assert item["key"] == "clip_b/00000003" and item["hr"].shape == (3, 3, 8, 8)
    videos = VideoClipDataset(tmp_path / "clip_b.mp4", clip_length=2, stride=2, flip=False, temporal_reverse=False)
    assert len(videos) == 4
    assert videos[0]["hr"].shape == (2, 3, 16, 16)


def test_adobe240_layout_and_several_roots(tmp_path):
    write_frames(tmp_path / "a" / "GOPR9633", 9)
    write_frames(tmp_path / "b" / "IMG_0001", 9, size=(16, 20))
    dataset = VideoClipDataset(
        [tmp_path / "a", tmp_path / "b"], clip_length=9, crop_size=16, layout="adobe240", temporal_skip=3
    )
    assert len(dataset) == 2
    item = dataset[1]
    assert item["key"] == "IMG_0001/00000000"
    assert item["key_frames"].tolist() == [0, 4, 8] and item["interp_frames"].tolist() == [1, 2, 3, 5, 6, 7]
    assert item["hr"].shape == (9, 3, 16, 16)


def test_missing_and_empty_roots_name_path_and_layout(tmp_path):
    with pytest.raises(ValueError, match=r"dataset root .*nowhere does not exist; layout 'reds' expects root/<seq>/"):
        VideoClipDataset(tmp_path / "nowhere", clip_length=3, layout="reds")
    (tmp_path / "empty" / "000").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no frames found under .*empty; layout 'vimeo90k' expects root/sequences"):
        VideoClipDataset(tmp_path / "empty", clip_length=3, layout="vimeo90k")
    with pytest.raises(ValueError, match="unknown layout 'kinetics'"):
        VideoClipDataset(tmp_path / "empty", clip_length=3, layout="kinetics")
    write_frames(tmp_path / "short" / "000", 2)
    with pytest.raises(ValueError, match="has the 3 frames a clip spans"):
        VideoClipDataset(tmp_path / "short", clip_length=3)


def test_paired_folders_whole_sequences_and_windows(tmp_path):
    write_frames(tmp_path / "GT" / "calendar", 5)
    write_frames(tmp_path / "BIx4" / "calendar", 5, size=(4, 4))
    whole = PairedVideoDataset(tmp_path / "BIx4", tmp_path / "GT", layout="udm10")
    assert len(whole) == 1
    item = whole[0]
    assert (
        item["lr"].shape == (5, 3, 4, 4) and item["hr"].shape == (5, 3, 16, 16) and item["key"] == "calendar/00000000"
    )
    windows = PairedVideoDataset(tmp_path / "BIx4", tmp_path / "GT", clip_length=2)
    # Windows cover the sequence, the last one ends at its final frame.
    assert [windows[i]["key"] for i in range(len(windows))] == [
        "calendar/00000000",
        "calendar/00000002",
        "calendar/00000003",
    ]
    assert frame_indices(windows[2]["hr"]) == frame_indices(windows[2]["lr"]) == [3, 4]


def test_paired_temporal_skip_keeps_lr_key_frames(tmp_path):
    write_frames(tmp_path / "gt" / "000", 6)
    write_frames(tmp_path / "lr" / "000", 6, size=(4, 4))
    item = PairedVideoDataset(tmp_path / "lr", tmp_path / "gt", temporal_skip=1)[0]
    # 6 frames with skip 1 cut to 5 (the last frame is a key frame): LR at frames 0, 2, 4.
    assert frame_indices(item["hr"]) == [0, 1, 2, 3, 4]
    assert frame_indices(item["lr"]) == [0, 2, 4]
    assert item["key_frames"].tolist() == [0, 2, 4] and item["interp_frames"].tolist() == [1, 3]


def test_paired_spmcs_and_reds4_layouts(tmp_path):
    spmcs = tmp_path / "SPMCS"
    write_frames(spmcs / "car_05_001" / "truth", 3)
    write_frames(spmcs / "car_05_001" / "input4", 3, size=(4, 4))
    item = PairedVideoDataset(spmcs, spmcs, layout="spmcs")[0]
    assert item["hr"].shape == (3, 3, 16, 16) and item["lr"].shape == (3, 3, 4, 4)

    gt, lr = tmp_path / "train_sharp", tmp_path / "train_sharp_bicubic" / "X4"
    for name in ("000", "001", "011", "015", "020"):
        write_frames(gt / name, 2)
        write_frames(lr / name, 2, size=(4, 4))
    reds4 = PairedVideoDataset(lr, gt, layout="reds4")
    assert [reds4[i]["key"] for i in range(len(reds4))] == [f"{n}/00000000" for n in ("000", "011", "015", "020")]


def test_paired_errors(tmp_path):
    with pytest.raises(ValueError, match=r"dataset root .*GT does not exist; layout 'udm10' expects gt_root/<seq>/"):
        PairedVideoDataset(tmp_path / "LR", tmp_path / "GT", layout="udm10")
    write_frames(tmp_path / "GT" / "000", 4)
    write_frames(tmp_path / "LR" / "000", 3, size=(4, 4))
    with pytest.raises(ValueError, match=r"LR/000 holds 3 frames, .*GT/000 holds 4"):
        PairedVideoDataset(tmp_path / "LR", tmp_path / "GT")
    write_frames(tmp_path / "LR" / "000", 4, size=(4, 4))
    with pytest.raises(
        ValueError, match=r"no frames found in .*GT/011; layout 'reds4' expects gt_root/<seq>/<frame>.png"
    ):
        PairedVideoDataset(tmp_path / "LR", tmp_path / "GT", layout="reds4")
    with pytest.raises(ValueError, match="unknown paired layout 'div2k'"):
        PairedVideoDataset(tmp_path / "LR", tmp_path / "GT", layout="div2k")


def test_lr_video_dataset(tmp_path):
    write_frames(tmp_path / "VideoLQ" / "000", 4)
    write_frames(tmp_path / "VideoLQ" / "001", 2)
    dataset = LRVideoDataset(tmp_path / "VideoLQ")
    assert len(dataset) == 2 and set(dataset[0]) == {"lr", "key"}
    assert dataset[0]["lr"].shape == (4, 3, 16, 16) and dataset[1]["key"] == "001/00000000"
    assert len(LRVideoDataset(tmp_path / "VideoLQ", clip_length=2)) == 3
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"no frames found under .*none; layout 'youhq' expects"):
        LRVideoDataset(tmp_path / "none")


def test_frames_of_different_sizes_in_one_folder(tmp_path):
    write_frames(tmp_path / "000", 2)
    write_frames(tmp_path / "000", 1, size=(8, 8), names="{:08d}b.png")
    with pytest.raises(ValueError, match=r"000: frames differ in size \[\(8, 8\), \(16, 16\)\]"):
        VideoClipDataset(tmp_path, clip_length=3)[0]


@pytest.mark.skipif(not SHARED_CLIPS.is_dir(), reason="../shared/clips is absent")
def test_lr_video_dataset_reads_real_clips():
    dataset = LRVideoDataset(SHARED_CLIPS, clip_length=4)
    assert len(dataset.sequences) >= 1
    for source in dataset.sequences:
        assert source.video is not None and source.num_frames == probe_video(source.video).num_frames
    info = probe_video(dataset.sequences[0].video)
    item = dataset[0]
    assert item["lr"].shape == (4, 3, info.height, info.width)
    assert item["lr"].min() >= 0 and item["lr"].max() <= 1 and item["lr"].std() > 0.01


def test_sample_clip_dataset():
    dataset = SampleClipDataset(clip_length=3, size=(32, 40))
    clips = sample_clips(8, (32, 40))
    assert len(dataset) == 5 * 6
    item = dataset[7]  # second clip, window starting at frame 1
    assert item["key"] == f"{SAMPLE_CLIP_NAMES[1]}/00000001"
    assert torch.equal(item["hr"], clips[1].frames[1:4]) and torch.equal(item["flow"], clips[1].flow[1:3])
    stvsr = SampleClipDataset(num_clips=2, clip_length=5, size=(32, 40), temporal_skip=1)
    assert len(stvsr) == 2 * 4 and stvsr[0]["key_frames"].tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match=r"clip_length must be in \[1, num_frames=8\], got 9"):
        SampleClipDataset(clip_length=9)


def test_epoch_shuffle_sampler_is_seeded_and_tells_the_dataset(tmp_path):
    write_frames(tmp_path / "000", 12)
    dataset = VideoClipDataset(tmp_path, clip_length=2)
    sampler = EpochShuffleSampler(dataset, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(11)) and first == list(EpochShuffleSampler(dataset, seed=3))
    sampler.set_epoch(1)
    assert dataset.epoch == 1 and list(sampler) != first


def test_epoch_shuffle_sampler_splits_one_order_between_processes():
    dataset = list(range(11))
    whole = EpochShuffleSampler(dataset, seed=3)
    ranks = [EpochShuffleSampler(dataset, seed=3, num_replicas=2, rank=rank) for rank in (0, 1)]
    # 11 positions padded to 12 by the next permutation's first index; rank r takes positions r, r + 2, ...
    order = ranks[0].order()
    assert order[:11].tolist() == list(whole) and len(order) == 12
    assert [list(r) for r in ranks] == [order[0::2].tolist(), order[1::2].tolist()]
    assert len(ranks[0]) == len(ranks[1]) == 6
    # num_samples longer than the dataset: permutations one after the other.
    long = EpochShuffleSampler(dataset, seed=3, num_samples=25).order()
    assert sorted(long[:11].tolist()) == sorted(long[11:22].tolist()) == dataset and len(long) == 25


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_resumable_loader_continues_the_epoch_where_its_state_was_saved(num_replicas):
    dataset = list(range(20))

    def loader(rank: int) -> ResumableDataLoader:
        sampler = EpochShuffleSampler(dataset, seed=5, num_replicas=num_replicas, rank=rank)
        return ResumableDataLoader(dataset, sampler, batch_size=3)

    for rank in range(num_replicas):
        uninterrupted = loader(rank)
        uninterrupted.sampler.set_epoch(2)
        expected = [batch.tolist() for batch in uninterrupted]
        interrupted = loader(rank)
        interrupted.sampler.set_epoch(2)
        batches = iter(interrupted)
        seen = [next(batches).tolist() for _ in range(2)]
        state = interrupted.state_dict()
        assert state == {"epoch": 2, "consumed": 2 * 3 * num_replicas, "total": 20}
        resumed = loader(rank)
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(2)  # Lightning sets the same epoch again before iterating
        rest = [batch.tolist() for batch in resumed]
        assert seen + rest == expected
        # Resumed twice: the count goes on from where the resumed loader started.
        assert resumed.state_dict()["consumed"] == 20


def test_resumable_loader_saved_at_an_epoch_end_resumes_at_the_next_epoch():
    dataset = list(range(8))
    ended = ResumableDataLoader(dataset, EpochShuffleSampler(dataset), batch_size=3, drop_last=True)
    assert len(list(ended)) == 2  # 6 of 8 positions: the 2 left make no batch
    resumed = ResumableDataLoader(dataset, EpochShuffleSampler(dataset), batch_size=3, drop_last=True)
    resumed.load_state_dict(ended.state_dict())
    assert resumed.sampler.epoch == 1 and len(list(resumed)) == 2
    with pytest.raises(ValueError, match="EpochShuffleSampler"):
        ResumableDataLoader(dataset, torch.utils.data.SequentialSampler(dataset))


# DataModule -------------------------------------------------------------------------------------


def test_default_datamodule_uses_sample_clips_and_makes_lr():
    datamodule = VSRDataModule(clip_length=3, crop_size=32, batch_size=2, degradation="bicubic")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["hr"].shape == (2, 3, 3, 32, 32) and "lr" not in batch
    hr = batch["hr"].clone()
    batch = datamodule.on_after_batch_transfer(batch, 0)
    assert batch["lr"].shape == (2, 3, 3, 8, 8)
    assert torch.equal(batch["lr"], BicubicDegradation(4)(hr))
    assert len(datamodule.val_dataloader()) == 30


def test_datamodule_default_degradation_is_realesrgan_and_seeded():
    datamodule = VSRDataModule(clip_length=2, crop_size=32, batch_size=1)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    first = datamodule.on_after_batch_transfer(dict(batch), 0)["lr"]
    again = datamodule.on_after_batch_transfer(dict(batch), 0)["lr"]
    assert first.shape == (1, 2, 3, 8, 8) and torch.equal(first, again)


class RecordingDegradation:
    """Keeps every other pixel and remembers the generator's first draw."""

    scale = 2

    def __init__(self) -> None:
        self.draws: list[float] = []

    def __call__(self, clips, generator=None):
        self.draws.append(float(torch.rand((), generator=generator)))
        return clips[..., ::2, ::2]


def test_datamodule_with_roots_temporal_skip_and_degradation_object(tmp_path):
    write_frames(tmp_path / "train" / "000", 10)
    degradation = RecordingDegradation()
    datamodule = VSRDataModule(
        train_roots=[str(tmp_path / "train")],
        clip_length=5,
        crop_size=8,
        batch_size=3,
        scale=2,
        degradation=degradation,
        temporal_skip=1,
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = datamodule.on_after_batch_transfer(batch, 0)
    assert batch["hr"].shape == (3, 5, 3, 8, 8)
    assert batch["lr"].shape == (3, 3, 3, 4, 4)  # key frames 0, 2, 4 only
    assert torch.equal(batch["lr"], batch["hr"][:, ::2, :, ::2, ::2])
    datamodule.on_after_batch_transfer({"hr": batch["hr"], "key": batch["key"], "key_frames": batch["key_frames"]}, 0)
    assert degradation.draws[0] == degradation.draws[1]  # same clips outside training: same seed
    other = list(batch["key"])[::-1]
    assert datamodule.degradation_seed(other) != datamodule.degradation_seed(batch["key"])


def test_datamodule_passes_paired_batches_through():
    datamodule = VSRDataModule(degradation="bicubic")
    lr = torch.rand(1, 2, 3, 4, 4)
    batch = datamodule.on_after_batch_transfer({"lr": lr, "hr": torch.rand(1, 2, 3, 16, 16), "key": ["a"]}, 0)
    assert batch["lr"] is lr


def test_datamodule_rejects_crop_not_multiple_of_scale_and_unknown_degradation():
    with pytest.raises(ValueError, match="crop_size must be a multiple of scale=4, got 30"):
        VSRDataModule(crop_size=30, degradation="bicubic")
    with pytest.raises(ValueError, match="unknown degradation 'jpeg'"):
        VSRDataModule(degradation="jpeg")


def test_datamodule_signature_builds_from_the_command_line(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(VSRDataModule, "data")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    roots = f"--data.train_roots=[{tmp_path / 'a'}, {tmp_path / 'b'}]"
    config = parser.parse_args(["--data.degradation=blurdown", "--data.crop_size=16", roots])
    datamodule = parser.instantiate_classes(config).data
    assert datamodule.train_roots == [str(tmp_path / "a"), str(tmp_path / "b")] and datamodule.crop_size == 16
    assert math.isclose(datamodule.degradation.sigma, 1.6)


def test_datamodule_in_a_trainer_step():
    from lightning.pytorch import LightningModule, Trainer

    class Probe(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))
            self.shapes: list[tuple] = []

        def training_step(self, batch, batch_idx):
            self.shapes.append((tuple(batch["hr"].shape), tuple(batch["lr"].shape)))
            return (self.weight * batch["lr"]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(probe, datamodule=VSRDataModule(clip_length=2, crop_size=16, batch_size=2, degradation="bicubic"))
    assert probe.shapes == [((2, 2, 3, 16, 16), (2, 2, 3, 4, 4))] * 2


def test_recipes_can_name_a_degradation_by_class_path():
    from jsonargparse import ArgumentParser

    from zoo.components.train.degradation import BlurDownDegradation

    parser = ArgumentParser()
    parser.add_class_arguments(VSRDataModule, "data")
    spec = '{"class_path": "zoo.components.train.degradation.BlurDownDegradation", "init_args": {"sigma": 1.2}}'
    data = parser.instantiate(parser.parse_args(["--data.degradation", spec])).data
    assert isinstance(data.degradation, BlurDownDegradation) and data.degradation.sigma == 1.2
