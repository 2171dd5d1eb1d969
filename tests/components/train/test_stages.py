"""StageSchedule: freezing at milestones, optimizer rebuilds, resuming mid-stage, two optimizers, YAML."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoo.components.train.stages import Stage, StageSchedule

# Identical batches: a resumed run sees the same data as an uninterrupted one wherever it restarts the epoch.
DATA = TensorDataset(torch.ones(64, 2))


def loader() -> DataLoader:
    return DataLoader(DATA, batch_size=4)


def trainer(max_steps: int, schedule: StageSchedule, tmp_path) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        callbacks=[schedule],
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class ThreeLayers(LightningModule):
    """Three Linear submodules; records, at every step, what the schedule made of it."""

    loss_names = ("l2", "lpips")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)
        self.records: list[dict] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.trainer.optimizers[0]
        names = {id(p): n for n, p in self.named_parameters()}
        self.records.append(
            {
                "step": self.trainer.global_step,
                "stage": self.stage.name,
                "loss_weights": self.loss_weights,
                "requires_grad": {n for n, p in self.named_parameters() if p.requires_grad},
                "optimized": {names[id(p)] for g in optimizer.param_groups for p in g["params"]},
                "lr": optimizer.param_groups[0]["lr"],
                "weight_decay": optimizer.param_groups[0]["weight_decay"],
            }
        )
        return self.c(self.b(self.a(batch[0]))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.stage.lr, **self.stage.optimizer_kwargs)


def three_stages() -> StageSchedule:
    return StageSchedule(
        [
            Stage("first", steps=3, trainable=["a.*"], loss_weights={"l2": 1.0}, lr=0.1),
            Stage(
                "second",
                steps=4,
                trainable=["b.*"],
                loss_weights={"l2": 1.0, "lpips": 2.0},
                lr=0.01,
                optimizer_kwargs={"weight_decay": 0.5},
            ),
            Stage("third", steps=-1, trainable=["c.weight", "a.bias"], lr=0.001),
        ]
    )


EXPECTED = {
    "first": ({"a.weight", "a.bias"}, 0.1),
    "second": ({"b.weight", "b.bias"}, 0.01),
    "third": ({"c.weight", "a.bias"}, 0.001),
}


def test_a_misspelt_loss_weight_stops_training_before_the_first_step(tmp_path) -> None:
    module = ThreeLayers()
    schedule = StageSchedule([Stage("only", steps=2, trainable=["a.*"], loss_weights={"l2": 1.0, "lpisp": 2.0})])
    expected = r"stage 'only' weights unknown loss\(es\) lpisp; ThreeLayers computes l2, lpips"
    with pytest.raises(ValueError, match=expected):
        trainer(2, schedule, tmp_path).fit(module, loader())
    assert module.records == []


def test_stages_switch_at_milestones(tmp_path) -> None:
    module, schedule = ThreeLayers(), three_stages()
    b_before = module.b.weight.detach().clone()
    trainer(10, schedule, tmp_path).fit(module, loader())

    assert [r["stage"] for r in module.records] == ["first"] * 3 + ["second"] * 4 + ["third"] * 3
    assert [r["step"] for r in module.records] == list(range(10))
    for record in module.records:
        trainable, lr = EXPECTED[record["stage"]]
        assert record["requires_grad"] == trainable
        assert record["optimized"] == trainable
        assert record["lr"] == lr
    assert module.records[3]["weight_decay"] == 0.5 and module.records[0]["weight_decay"] == 0.01
    assert module.records[3]["loss_weights"] == {"l2": 1.0, "lpips": 2.0}
    assert module.records[8]["loss_weights"] == {}
    assert schedule.current_stage.name == "third"
    assert float(trainer_metrics(module)["stage"]) == 2.0
    assert not torch.equal(module.b.weight, b_before)  # stage two trained b


def trainer_metrics(module: LightningModule) -> dict:
    return module.trainer.callback_metrics


def test_finite_schedule_ends_training(tmp_path) -> None:
    module = ThreeLayers()
    schedule = StageSchedule([Stage("only", steps=4, trainable=["*"])])
    fit = trainer(50, schedule, tmp_path)
    fit.fit(module, loader())
    assert fit.global_step == 4


@pytest.mark.parametrize("stop_at", [3, 5])
def test_resume_mid_schedule_restores_stage_lr_and_optimizer(tmp_path, stop_at: int) -> None:
    uninterrupted = ThreeLayers()
    trainer(9, three_stages(), tmp_path).fit(uninterrupted, loader())

    first_half = ThreeLayers()
    first_trainer = trainer(stop_at, three_stages(), tmp_path)
    first_trainer.fit(first_half, loader())
    first_trainer.save_checkpoint(tmp_path / "mid.ckpt")

    resumed, schedule = ThreeLayers(), three_stages()
    trainer(9, schedule, tmp_path).fit(resumed, loader(), ckpt_path=tmp_path / "mid.ckpt")

    first = resumed.records[0]
    assert first["step"] == stop_at
    assert first["stage"] == "second"
    assert first["requires_grad"] == first["optimized"] == EXPECTED["second"][0]
    assert first["lr"] == EXPECTED["second"][1]
    assert [r["stage"] for r in resumed.records] == [r["stage"] for r in uninterrupted.records[stop_at:]]
    # Adam moments restored into the right parameter groups: the weights end bit-identical.
    for (name, p), q in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_resume_sets_the_stage_before_optimizers_are_built(tmp_path) -> None:
    first_trainer = trainer(5, three_stages(), tmp_path)
    first_trainer.fit(ThreeLayers(), loader())
    first_trainer.save_checkpoint(tmp_path / "mid.ckpt")

    built_for: list[str] = []

    class Recording(ThreeLayers):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            built_for.append(self.stage.name)
            return super().configure_optimizers()

    schedule = three_stages()
    trainer(6, schedule, tmp_path).fit(Recording(), loader(), ckpt_path=tmp_path / "mid.ckpt")
    assert built_for == ["second"]
    assert schedule.current_index == 1


def test_checkpoint_from_another_schedule_is_rejected() -> None:
    schedule = three_stages()
    with pytest.raises(ValueError, match="saved in stage 1 'warmup'"):
        schedule.load_state_dict({"index": 1, "name": "warmup"})


def test_pattern_matching_nothing_fails_at_setup(tmp_path) -> None:
    schedule = StageSchedule([Stage("one", steps=-1, trainable=["a.*", "mff.*"])])
    message = "stage 'one': pattern 'mff.*' matches no parameter of ThreeLayers"
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer(2, schedule, tmp_path).fit(ThreeLayers(), loader())


def test_unsupported_strategy_fails_at_setup() -> None:
    class OtherStrategy:
        pass

    schedule = three_stages()
    with pytest.raises(ValueError, match="supports single-device, DDP and FSDP strategies, got OtherStrategy"):
        schedule.setup(SimpleNamespace(strategy=OtherStrategy()), ThreeLayers(), "fit")


def test_fsdp_needs_the_original_parameters() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    schedule = three_stages()
    with pytest.raises(ValueError, match=r"FSDPStrategy\(use_orig_params=True\)"):
        schedule.setup(SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False)), ThreeLayers(), "fit")
    module = ThreeLayers()
    # Lightning's default keeps the original parameters.
    schedule.setup(SimpleNamespace(strategy=FSDPStrategy(), optimizers=[]), module, "fit")
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"a.weight", "a.bias"}


def test_patterns_see_through_fsdp_wrapper_segments() -> None:
    from zoo.components.train.stages import unwrapped_name

    name = "net.blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.to_q.weight"
    assert unwrapped_name(name) == "net.blocks.0.attn.to_q.weight"
    assert Stage("s", 1, ["net.blocks.*.attn.to_q.*"]).trains(unwrapped_name(name))


def test_stage_and_schedule_validation() -> None:
    with pytest.raises(ValueError, match="steps must be positive or -1, got 0"):
        Stage("x", steps=0, trainable=["*"])
    with pytest.raises(ValueError, match="trainable must name"):
        Stage("x", steps=3, trainable=[])
    with pytest.raises(ValueError, match="only the last stage"):
        StageSchedule([Stage("x", steps=-1, trainable=["*"]), Stage("y", steps=3, trainable=["*"])])
    with pytest.raises(ValueError, match="unique"):
        StageSchedule([Stage("x", steps=1, trainable=["*"]), Stage("x", steps=3, trainable=["*"])])
    schedule = StageSchedule([Stage("x", steps=2, trainable=["*"]), Stage("y", steps=3, trainable=["*"])])
    assert [schedule.stage_index_at(s) for s in range(7)] == [0, 0, 1, 1, 1, 1, 1]


def test_ddp_module_is_rewrapped_at_a_switch(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DDP only reduces the parameters that required grad when it wrapped the module: without re-wrapping,
    the first step after a switch fails (here in a one-process gloo group)."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)  # whatever Lightning sets is undone after the test
    module = ThreeLayers()
    fit = Trainer(
        max_steps=8,
        callbacks=[three_stages()],
        accelerator="cpu",
        devices=1,
        strategy="ddp",
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        fit.fit(module, loader())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert [r["stage"] for r in module.records] == ["first"] * 3 + ["second"] * 4 + ["third"]
    assert module.records[-1]["optimized"] == EXPECTED["third"][0]


class TinyGAN(LightningModule):
    """Manual optimization: generator AdamW (stage LR), discriminator SGD with momentum, alternating."""

    loss_names = ("l2", "lpips")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.disc = nn.Linear(2, 1)
        self.momentum: list[tuple[str, str, torch.Tensor | None]] = []
        self.generator_params: list[set[int]] = []

    def disc_momentum(self) -> torch.Tensor | None:
        state = self.trainer.optimizers[1].state.get(self.disc.weight, {})
        return state["momentum_buffer"].clone() if "momentum_buffer" in state else None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        gen_opt, disc_opt = self.optimizers()
        self.momentum.append(("start", self.stage.name, self.disc_momentum()))
        self.generator_params.append({id(p) for g in gen_opt.param_groups for p in g["params"]})
        fake = self.gen(batch[0])
        self.manual_backward(-self.disc(fake).mean())
        gen_opt.step()
        gen_opt.zero_grad()
        disc_loss = self.disc(fake.detach()).mean() - self.disc(batch[0]).mean()
        self.manual_backward(disc_loss)
        disc_opt.step()
        disc_opt.zero_grad()
        self.momentum.append(("end", self.stage.name, self.disc_momentum()))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        gen = [p for p in self.gen.parameters() if p.requires_grad]
        disc = [p for p in self.disc.parameters() if p.requires_grad]
        return [torch.optim.AdamW(gen, lr=self.stage.lr), torch.optim.SGD(disc, lr=0.1, momentum=0.9)]


def test_two_optimizers_keep_discriminator_state_across_a_switch(tmp_path) -> None:
    module = TinyGAN()
    schedule = StageSchedule(
        [
            Stage("afat", steps=4, trainable=["gen.0.*", "disc.*"], lr=1e-3),
            Stage("mff", steps=-1, trainable=["gen.1.*", "disc.*"], lr=1e-4),
        ]
    )
    trainer(8, schedule, tmp_path).fit(module, loader())  # two optimizer steps per batch: 4 batches

    assert [stage for when, stage, _ in module.momentum if when == "start"] == ["afat", "afat", "mff", "mff"]
    end_of_afat, start_of_mff = module.momentum[3], module.momentum[4]
    assert (end_of_afat[:2], start_of_mff[:2]) == (("end", "afat"), ("start", "mff"))
    assert torch.equal(start_of_mff[2], end_of_afat[2])
    assert module.generator_params[2] == {id(p) for p in module.gen[1].parameters()}
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == 1e-4
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        "gen.1.weight",
        "gen.1.bias",
        "disc.weight",
        "disc.bias",
    }


def test_lightning_cli_builds_the_schedule_from_yaml(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning"])
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"""
trainer:
  logger: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: zoo.components.train.stages.StageSchedule
      init_args:
        stages:
          - name: afat
            steps: 100
            trainable: ["net.unet.*lora*"]
            loss_weights: {{l2: 1.0, lpips: 2.0}}
            lr: 5.0e-5
            optimizer_kwargs: {{weight_decay: 0.01, betas: [0.9, 0.99]}}
          - {{name: mff, steps: -1, trainable: ["net.mff.*"], lr: 1.0e-5}}
"""
    )
    cli = LightningCLI(ThreeLayers, run=False, args=["--config", str(config)])
    schedule = next(cb for cb in cli.trainer.callbacks if isinstance(cb, StageSchedule))
    assert schedule.stages == [
        Stage(
            "afat",
            100,
            ["net.unet.*lora*"],
            {"l2": 1.0, "lpips": 2.0},
            5e-5,
            {"weight_decay": 0.01, "betas": [0.9, 0.99]},
        ),
        Stage("mff", -1, ["net.mff.*"], {}, 1e-5, {}),
    ]
    assert isinstance(schedule, Callback)
