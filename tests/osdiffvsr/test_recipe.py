"""OS-DiffVSR recipes: the tiny one trains the paper's joint objective and exports exactly (DDP and resuming
after a kill: tests/test_recipes.py); the DataModule; the full recipe holds Sec. 4.1's settings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import zoo.hub
from zoo.cli import lightning_main
from zoo.osdiffvsr.callbacks import PAPER_LOSS_WEIGHTS
from zoo.osdiffvsr.data import REDS4, OSDiffVSRDataModule
from zoo.osdiffvsr.module import OSDiffVSRModule
from zoo.osdiffvsr.network import OSDiffVSRConfig

REPO = Path(__file__).parents[2]


def test_tiny_recipe_trains_the_joint_objective_and_exports_exactly(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[frozenset[str], frozenset[str], bool]] = []
    step = OSDiffVSRModule.training_step

    def recording_step(self: OSDiffVSRModule, batch, batch_idx):
        trainable = frozenset(name for name, p in self.named_parameters() if p.requires_grad)
        seen.append((trainable, frozenset(self.loss_weights.items()), self.fuse))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(OSDiffVSRModule, "training_step", recording_step)
    # The README's command, verbatim, from a folder that is not the checkout.
    monkeypatch.chdir(tmp_path)
    lightning_main(["fit", "-c", "recipes/tiny/osdiffvsr.yaml"])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 8  # 4 batches, each stepping the generator and the discriminator

    module = OSDiffVSRModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    names = [name for name, _ in module.named_parameters()]
    # P:74-76: LoRA on the VAE encoder and the UNet, MFF and the discriminator in full; the decoder frozen.
    expected = frozenset(n for n in names if n.startswith(("net.vae.encoder.", "net.vae.quant_conv.", "net.unet."))
                         and ".lora_" in n) | frozenset(n for n in names if n.startswith(("net.fusion.",
                                                                                         "discriminator.")))
    assert set(seen) == {(expected, frozenset(PAPER_LOSS_WEIGHTS.items()), True)} and len(seen) == 4
    assert not any(n.startswith(("net.vae.decoder.", "net.vae.post_quant_conv.")) for n in expected)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/adversarial", "train/fmse", "train/lpips", "train/warp", "train/d_loss", "val/psnr"} <= set(metrics)

    folder = zoo.hub.export_checkpoint(ckpt, tmp_path / "export")
    assert (folder / "README.md").is_file()
    upscaler = torch.hub.load(str(REPO), "osdiffvsr", source="local", weights=str(folder))
    torch.manual_seed(0)
    frames = torch.rand(3, 3, 20, 28)
    reference = copy.deepcopy(module.to_upscaler())
    reference.merge_lora()  # as zoo.load and torch.hub.load do: the same merge of the same weights,
    reference.fuse_projections()  # and the same fused attention projections
    assert torch.equal(upscaler(frames), reference(frames))


def test_datamodule_defaults_to_sample_clips_of_three_frames() -> None:
    data = OSDiffVSRDataModule(crop_size=64, batch_size=2, num_workers=0)
    assert data.scale == OSDiffVSRConfig().scale  # the generator's factor, not a second constant
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = data.on_after_batch_transfer(batch, 0)
    assert batch["hr"].shape == (2, 3, 3, 64, 64)
    assert batch["lr"].shape == (2, 3, 3, 16, 16)
    assert type(data.degradation).__name__ == "RealBasicVSRDegradation"  # no trainer: evaluation
    assert type(data.train_degradation).__name__ == "RealESRGANDegradation"
    assert OSDiffVSRDataModule().batch_size == 8 and OSDiffVSRDataModule().crop_size == 512


def _write_sequence(folder: Path, num_frames: int) -> None:
    folder.mkdir(parents=True)
    for index in range(num_frames):
        Image.new("RGB", (16, 16), (10 * index, 0, 0)).save(folder / f"{index:08d}.png")


def test_datamodule_leaves_reds4_out_keeps_time_order_and_reads_each_frames_prompt(tmp_path: Path) -> None:
    roots = tmp_path / "train_sharp"
    for key in (*REDS4, "001"):
        _write_sequence(roots / key, 5)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    # Row t of sequence 001's embeddings holds the value 100 + t.
    save_file({"prompt_embeds": 100 + torch.arange(5.0).view(5, 1, 1).expand(5, 2, 3).contiguous()},
              prompts / "001.safetensors")
    data = OSDiffVSRDataModule(train_roots=[str(roots)], crop_size=16, batch_size=3, num_workers=0,
                               prompt_embeds_root=str(prompts))
    data.setup("fit")
    dataset = data._dataset("train")
    assert len(dataset) == 3  # 001's three windows; REDS4 is a test set (P:219)
    for index in range(3):
        item = dataset[index]
        frames = [round(v) for v in (item["hr"][:, 0, 0, 0] * 255 / 10).tolist()]
        assert frames == sorted(frames)  # never reversed: frame 0 is always I_{i-1}
        assert item["prompt_embeds"].shape == (3, 2, 3)
        assert item["prompt_embeds"][:, 0, 0].tolist() == [100 + f for f in frames]
    dataset.set_epoch(3)
    assert dataset.clips.epoch == 3  # the sampler's epoch reaches the augmentation seeds
    with pytest.raises(ValueError, match="lacks 4 sequence file"):
        OSDiffVSRDataModule(train_roots=[str(roots)], crop_size=16, exclude_sequences=[],
                            prompt_embeds_root=str(prompts)).train_dataset()


def test_datamodule_rejects_clips_shorter_than_the_window() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        OSDiffVSRDataModule(clip_length=2)


def test_full_recipe_holds_section_4_1(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(REPO)
    with torch.device("meta"):  # the architecture without memory for 1B parameters
        cli = LightningCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
            args=["-c", "recipes/osdiffvsr.yaml", "--model.init_args.base_model=null",
                  "--model.init_args.flow_pretrained=false", "--model.init_args.discriminator_pretrained=false",
                  "--model.init_args.perceptual_pretrained=false", "--trainer.accelerator=cpu",
                  "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"])
    module = cli.model
    assert isinstance(module, OSDiffVSRModule)
    unet = module.net.unet
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.cross_attention_dim == 1024
    assert module.net.config.lora_rank == 32 and module.net.prompt_embeds.shape == (1, 77, 1024)
    base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    assert base == 865_910_724  # SD-2.1-base UNet
    assert module.discriminator.vit.embed_dim == 384 and len(module.discriminator.vit.blocks) == 12  # DINOv2-S
    assert module.hparams.tau == 0.01 and module.hparams.gamma == 1.0
    assert (module.hparams.lr, module.hparams.weight_decay) == (1e-5, 1e-8)
    assert (module.hparams.discriminator_lr, module.hparams.discriminator_warmup) == (5e-4, 500)
    stages = next(c for c in cli.trainer.callbacks if type(c).__name__ == "OSDiffVSRStages")
    (stage,) = stages.stages
    assert stage.name == "paper" and stage.steps == -1 and stage.fuse
    assert stage.loss_weights == {"adversarial": 1.0, "fmse": 1.0, "lpips": 2.0, "warp": 2.0}
    assert (stage.lr, stage.optimizer_kwargs) == (1e-5, {"weight_decay": 1e-8})
    data = cli.datamodule
    assert data.crop_size == 512 and data.clip_length == 3 and data.exclude_sequences == REDS4
    assert type(data.train_degradation).__name__ == "RealESRGANDegradation"
    assert cli.trainer.max_epochs == 150
    # The strategy and devices as the recipe writes them (the test overrode them to build on a CPU).
    recipe = cli.parser.parse_path(str(REPO / "recipes" / "osdiffvsr.yaml"))
    assert recipe.trainer.strategy == "ddp" and recipe.trainer.devices * data.batch_size == 8
