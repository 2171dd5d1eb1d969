"""OSDEnhancer recipes: the tiny one trains all four stages and exports exactly (DDP and resuming after a kill:
tests/test_recipes.py); the full one names FSDP and builds the paper's architecture."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import yaml

import zoo.hub
from zoo.cli import lightning_main
from zoo.osdenhancer.module import OSDEnhancerModule

REPO = Path(__file__).parents[2]
TINY = "recipes/tiny/osdenhancer.yaml"
STAGE_LOSSES = {
    0.0: {"train/reconstruction", "train/perceptual", "train/pixel_residual"},
    1.0: {"train/latent_mse"},
    2.0: {"train/latent_mse", "train/latent_residual"},
    3.0: {"train/l1", "train/dists", "train/warp"},
}


def _logged_losses_per_stage(metrics: Path) -> dict[float, set[str]]:
    stages: dict[float, set[str]] = {}
    with metrics.open() as file:
        for row in csv.DictReader(file):
            if row["stage"]:
                logged = {k for k, v in row.items() if k.startswith("train/") and k != "train/loss" and v}
                stages.setdefault(float(row["stage"]), set()).update(logged)
    return stages


def test_tiny_recipe_trains_all_four_stages_and_exports_exactly(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lightning_main(["fit", "-c", TINY])
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 8
    assert next(v for k, v in state["callbacks"].items() if "OSDEnhancerStages" in k)["name"] == "spatial"
    assert _logged_losses_per_stage(run / "metrics.csv") == STAGE_LOSSES

    folder = zoo.hub.export_checkpoint(ckpt, tmp_path / "export")
    assert (folder / "README.md").is_file() and (folder / "transformer" / "config.json").is_file()
    upscaler = torch.hub.load(str(REPO), "osdenhancer", source="local", weights=str(folder))
    module = OSDEnhancerModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    frames = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(module.to_upscaler())
    reference.merge_lora()  # as zoo.load and torch.hub.load do: the same merge of the same weights,
    reference.fuse_projections()  # and the same fused attention projections
    assert torch.equal(upscaler(frames), reference(frames))
    # Training moved every expert and decoder block away from its start.
    net = module.net
    assert net.transformer.transformer_blocks[0].attn1.to_q_TC_lora.lora_B.weight.abs().sum() > 0
    assert net.transformer.proj_out.lora_B["TE_lora"].weight.abs().sum() > 0
    assert net.vae.decoder.up_deformable_blocks[3].attn.project_out.weight.abs().sum() > 0


def test_full_recipe_names_fsdp_over_transformer_blocks() -> None:
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    from zoo.osdenhancer.network import OSDEnhancerBlock

    recipe = yaml.safe_load((REPO / "recipes" / "osdenhancer.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": recipe["trainer"]["strategy"]})).strategy
    assert strategy.kwargs["use_orig_params"] is True  # what the stages need
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {OSDEnhancerBlock}
    assert recipe["trainer"]["reload_dataloaders_every_n_epochs"] == 1
    assert recipe["trainer"]["max_steps"] == 5000 + 15000 + 10000 + 5000


def test_full_recipe_builds_the_paper_architecture_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(REPO)
    with torch.device("meta"):  # 6.4B parameters without their memory
        cli = LightningCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
            args=["-c", "recipes/osdenhancer.yaml", "--model.init_args.base_model=null",
                  "--model.init_args.perceptual_pretrained=false", "--model.init_args.flow_pretrained=false",
                  "--trainer.accelerator=cpu", "--trainer.strategy=auto", "--trainer.devices=1",
                  "--trainer.precision=32"])
    module = cli.model
    assert isinstance(module, OSDEnhancerModule)
    transformer = module.net.transformer
    assert transformer.config.num_layers == 42 and transformer.config.tr_rank == transformer.config.se_rank == 128
    assert sum(p.numel() for p in module.net.parameters()) == 6_167_609_984 + 250_883_619
    schedule = next(c for c in cli.trainer.callbacks if type(c).__name__ == "OSDEnhancerStages")
    assert [(s.name, s.steps) for s in schedule.stages] == [("decoder", 5000), ("adaptation", 15000),
                                                           ("temporal", 10000), ("spatial", 5000)]
    assert cli.datamodule.stages["temporal"].temporal_skips == (0, 1, 3, 7, 15)
