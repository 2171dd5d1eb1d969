"""Stream-DiffVSR training: tiny recipe through the CLI, stage parameters, distillation, export."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

import zoo.hub
from zoo.cli import lightning_main
from zoo.stream_diffvsr.callbacks import ARTG_PARAMETERS, DISTILL_PARAMETERS, TPM_PARAMETERS, StreamDiffVSRStages
from zoo.stream_diffvsr.data import StreamDiffVSRDataModule
from zoo.stream_diffvsr.module import StreamDiffVSRModule, warped_temporal_loss

REPO_ROOT = Path(__file__).parents[2]


def test_warped_temporal_loss_by_hand():
    # zero flow: W is the identity. ŷ_t - ŷ_{t-1} = 3 - 1 = 2, y_t - y_{t-1} = 2 - 1.5 = 0.5: |2 - 0.5| = 1.5.
    flow = torch.zeros(1, 2, 2, 2)
    full = lambda v: torch.full((1, 1, 2, 2), v)  # noqa: E731
    assert warped_temporal_loss(full(3.0), full(1.0), full(2.0), full(1.5), flow).item() == pytest.approx(1.5)
    # W samples prev at p + flow(p). prev = [[0, 4], [0, 4]]; flow x = +1 on the left column, 0 on the
    # right: W(prev) = 4 everywhere, so ŷ_t = 5 leaves a residual of 1 against a static zero target.
    prev = torch.tensor([[[[0.0, 4.0], [0.0, 4.0]]]])
    shift = torch.zeros(1, 2, 2, 2)
    shift[:, 0, :, 0] = 1.0
    zeros = torch.zeros(1, 1, 2, 2)
    assert warped_temporal_loss(full(5.0), prev, zeros, zeros, shift).item() == pytest.approx(1.0)
    # without motion compensation the residual is [[5, 1], [5, 1]]: mean 3.
    assert warped_temporal_loss(full(5.0), prev, zeros, zeros, flow).item() == pytest.approx(3.0)


def test_tiny_recipe_runs_all_stages_and_exports(tmp_path, monkeypatch):
    # The README's commands, verbatim, from a folder that is not the checkout.
    monkeypatch.chdir(tmp_path)
    lightning_main(["fit", "-c", "recipes/tiny/stream.yaml"])
    ckpt = Path("lightning_logs/version_0/checkpoints/last.ckpt")
    assert (tmp_path / "lightning_logs/version_0/config.yaml").is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert any(v.get("name") == "artg" for v in state["callbacks"].values() if isinstance(v, dict))

    folder = zoo.hub.export_checkpoint(ckpt, tmp_path / "export")
    assert (folder / "README.md").is_file() and (folder / "unet" / "config.json").is_file()
    hub = torch.hub.load(str(REPO_ROOT), "stream_diffvsr", source="local", weights=str(folder))
    module = StreamDiffVSRModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    video = torch.rand(3, 3, 16, 24)
    assert torch.equal(hub(video), module.to_upscaler()(video))


class ParameterRecorder(Callback):
    """Records, per stage, which parameters require grad and which changed over the stage's steps."""

    def __init__(self) -> None:
        self.trainable: dict[str, set[str]] = {}
        self.changed: dict[str, set[str]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        name = pl_module.stage.name
        self.trainable[name] = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        self._before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        changed = {n for n, p in pl_module.named_parameters() if not torch.equal(p, self._before[n])}
        self.changed.setdefault(pl_module.stage.name, set()).update(changed)


def _matching(names: list[str], patterns: list[str]) -> set[str]:
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def test_each_stage_trains_exactly_its_parameters(tmp_path):
    torch.manual_seed(0)
    module = StreamDiffVSRModule(variant="tiny", teacher_steps=4, lpips_pretrained=False, lpips_net="alex")
    data = StreamDiffVSRDataModule(clip_length=2, crop_size=32, batch_size=1, num_workers=0, degradation="bicubic")
    recorder = ParameterRecorder()
    stages = StreamDiffVSRStages(distill_steps=1, tpm_steps=1, artg_steps=1, distill_lr=1e-3, tpm_lr=1e-3,
                                 artg_lr=1e-3)
    trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=tmp_path, callbacks=[stages, recorder])
    trainer.fit(module, data)
    names = [n for n, _ in module.named_parameters()]
    expected = {"distill": _matching(names, DISTILL_PARAMETERS), "tpm": _matching(names, TPM_PARAMETERS),
                "artg": _matching(names, ARTG_PARAMETERS)}
    assert all(expected.values())
    assert not any(n.startswith("net.vae.encoder") for n in expected["tpm"])
    for stage, params in expected.items():
        assert recorder.trainable[stage] == params, stage
        # parameters without a gradient path in a stage (e.g. the UNet's unused up-block of frame 0)
        # may stay unchanged, but nothing outside the stage may change.
        assert recorder.changed[stage] <= params and recorder.changed[stage], stage


def test_distillation_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    module = StreamDiffVSRModule(variant="tiny", teacher_steps=4, lpips_pretrained=False, lpips_net="alex")
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    optimizer = torch.optim.Adam(module.net.unet.parameters(), lr=5e-3)
    losses = []
    for _ in range(10):
        terms = module.distillation_losses(lr, hr, generator=torch.Generator().manual_seed(0))
        loss = terms["teacher"] + terms["gt"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_teacher_runs_its_own_grid_below_the_student_timestep():
    module = StreamDiffVSRModule(variant="tiny", teacher_steps=8, lpips_pretrained=False, lpips_net="alex")
    calls = []
    module.teacher.register_forward_pre_hook(lambda mod, args: calls.append(int(args[1][0])))
    module.teacher_x0(torch.randn(1, 4, 8, 8), torch.zeros(1, 3, 8, 8), 749)
    # trailing 8-step grid: 999, 874, 749, 624, 499, 374, 249, 124; the teacher starts at 749.
    assert calls == [749, 624, 499, 374, 249, 124]


@pytest.mark.slow
def test_full_recipe_builds_full_architecture():
    args = yaml.safe_load((REPO_ROOT / "recipes" / "stream.yaml").read_text())["model"]["init_args"]
    assert args["variant"] == "full" and args["teacher_steps"] == 50
    # random init, no download: no x4-upscaler weights, random RAFT and LPIPS, on the meta device.
    args.update(base_model=None, flow_pretrained=False, lpips_pretrained=False)
    with torch.device("meta"):
        module = StreamDiffVSRModule(**args)
    assert list(module.net.unet.config.block_out_channels) == [256, 512, 512, 1024]
    assert module.net.unet.config.in_channels == 7 and module.net.controlnet.config.in_channels == 7
    assert sum(p.numel() for p in module.teacher.parameters()) == pytest.approx(473.4e6, rel=1e-3)
