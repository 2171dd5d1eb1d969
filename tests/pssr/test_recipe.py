"""PS-SR recipes: the tiny one trains the three phases and exports (DDP and resuming after a kill:
tests/test_recipes.py); the full one builds."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import zoo.hub
from zoo.cli import lightning_main
from zoo.pssr.data import PSSRDataModule
from zoo.pssr.module import PSSRModule

REPO = Path(__file__).parents[2]


def test_tiny_recipe_trains_the_three_phases_and_exports_exactly(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    trained: dict[str, set[frozenset[str]]] = {}
    step = PSSRModule.training_step

    def recording_step(self: PSSRModule, batch, batch_idx):
        names = frozenset(name for name, p in self.named_parameters() if p.requires_grad)
        trained.setdefault(self.stage.name, set()).add(names)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PSSRModule, "training_step", recording_step)
    # The README's command, verbatim, from a folder that is not the checkout.
    monkeypatch.chdir(tmp_path)
    lightning_main(["fit", "-c", "recipes/tiny/pssr.yaml"])

    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert next(v for k, v in state["callbacks"].items() if "PSSRStages" in k)["name"] == "draft"
    assert state["state_dict"]["draft_initialised"]
    module = PSSRModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    names = [name for name, _ in module.named_parameters()]
    base_lora = {n for n in names if n.startswith("net.base.") and "lora_" in n}
    assert trained == {
        "latent": {frozenset(base_lora | {n for n in names if n.startswith("vsd_fake.") and "lora_" in n}
                             | {n for n in names if n.startswith("discriminator.")})},
        "pixel": {frozenset(base_lora)},
        "draft": {frozenset(n for n in names if n.startswith("net.draft."))},
    }
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "val/psnr_base" in metrics and "val/psnr," in metrics  # the draft sampled in validation

    folder = zoo.hub.export_checkpoint(ckpt, tmp_path / "export")
    assert (folder / "README.md").is_file()
    upscaler = torch.hub.load(str(REPO), "pssr", source="local", weights=str(folder))
    frames = torch.rand(3, 3, 10, 14, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(module.to_upscaler())
    reference.merge_lora()  # as zoo.load and torch.hub.load do: the same merge of the same weights,
    reference.fuse_projections()  # and the same fused attention projections
    assert torch.equal(upscaler(frames), reference(frames))


def test_datamodule_gives_4n_plus_1_frame_clips_of_the_sample_videos() -> None:
    data = PSSRDataModule(clip_length=5, crop_size=32, num_workers=0)
    data.setup("fit")
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch["hr"].shape == (1, 5, 3, 32, 32) and batch["lr"].shape == (1, 5, 3, 8, 8)
    assert type(data.degradation).__name__ == "RealESRGANDegradation"
    with pytest.raises(ValueError, match="4n \\+ 1"):
        PSSRDataModule(clip_length=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        PSSRDataModule(crop_size=120)


def test_full_recipe_parses_and_builds_the_paper_architecture_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(REPO)
    with torch.device("meta"):  # the architecture without memory for 2B parameters
        cli = LightningCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
            args=["-c", "recipes/pssr.yaml", "--model.init_args.base_model=null",
                  "--model.init_args.perceptual_pretrained=false", "--trainer.accelerator=cpu",
                  "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"])
    module = cli.model
    assert isinstance(module, PSSRModule)
    assert module.net.config.lora_rank == 32 and len(module.net.base.blocks) == 30
    assert module.net.draft.kept == (2, 5, 8, 11, 14, 17, 20, 23, 26, 29)
    assert module.hparams.pixel_crop == 160 and module.net.base.gradient_checkpointing
    stages = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PSSRStages")
    assert [s.name for s in stages.stages] == ["latent", "pixel", "draft"]
    assert stages.stages[0].loss_weights == {"l2": 1.0, "vsd": 1.0, "adversarial": 0.1}
    assert stages.stages[2].loss_weights == {"l2": 1.0, "pixel_l2": 1.0, "lpips": 2.0}
    assert all(s.lr == 5e-5 for s in stages.stages)
    assert cli.datamodule.clip_length == 33 and cli.datamodule.batch_size == 1
