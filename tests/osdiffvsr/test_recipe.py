"""OS-DiffVSR recipes: the tiny one trains both stages and exports; the full one builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo.hub
from zoo.cli import lightning_main
from zoo.osdiffvsr.data import OSDiffVSRDataModule
from zoo.osdiffvsr.module import OSDiffVSRModule

REPO = Path(__file__).parents[2]


def test_tiny_recipe_trains_both_stages_and_exports_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's commands, verbatim, from a folder that is not the checkout.
    monkeypatch.chdir(tmp_path)
    lightning_main(["fit", "-c", "recipes/tiny/osdiffvsr.yaml"])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 8
    stage = next(v for k, v in state["callbacks"].items() if "OSDiffVSRStages" in k)
    assert stage["name"] == "mff"

    folder = zoo.hub.export_checkpoint(ckpt, tmp_path / "export")
    assert (folder / "README.md").is_file()
    upscaler = torch.hub.load(str(REPO), "osdiffvsr", source="local", weights=str(folder))
    module = OSDiffVSRModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    torch.manual_seed(0)
    frames = torch.rand(3, 3, 20, 28)
    with torch.no_grad():
        expected = module(frames[None])
    assert torch.equal(upscaler(frames)[1], expected[0])


def test_datamodule_defaults_to_sample_clips_of_three_frames() -> None:
    data = OSDiffVSRDataModule(crop_size=64, batch_size=2, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = data.on_after_batch_transfer(batch, 0)
    assert batch["hr"].shape == (2, 3, 3, 64, 64)
    assert batch["lr"].shape == (2, 3, 3, 16, 16)
    assert type(data.degradation).__name__ == "RealBasicVSRDegradation"  # no trainer: evaluation
    assert type(data.train_degradation).__name__ == "RealESRGANDegradation"


def test_datamodule_rejects_clips_shorter_than_the_window() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        OSDiffVSRDataModule(clip_length=2)


@pytest.mark.slow
def test_full_recipe_parses_and_builds_the_paper_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(REPO)
    with torch.device("meta"):  # the architecture without memory for 1B parameters
        cli = LightningCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
            args=["-c", "recipes/osdiffvsr.yaml", "--model.init_args.base_model=null",
                  "--model.init_args.flow_pretrained=false", "--model.init_args.discriminator_pretrained=false",
                  "--model.init_args.perceptual_pretrained=false", "--trainer.accelerator=cpu",
                  "--trainer.precision=32"])
    module = cli.model
    assert isinstance(module, OSDiffVSRModule)
    unet = module.net.unet
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.cross_attention_dim == 1024
    assert module.net.config.lora_rank == 32 and module.net.prompt_embeds.shape == (1, 77, 1024)
    base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    assert base == 865_910_724  # SD-2.1-base UNet
    assert module.discriminator.vit.embed_dim == 384 and len(module.discriminator.vit.blocks) == 12
    assert cli.datamodule.crop_size == 512 and cli.datamodule.clip_length == 3
