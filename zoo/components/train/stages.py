"""Training stages as a Lightning callback: which parameters train, which losses count, at which LR, how long.

A recipe lists the stages; `StageSchedule` switches between them at step milestones:

```yaml
trainer:
  callbacks:
    - class_path: zoo.components.train.stages.StageSchedule
      init_args:
        stages:
          - {name: afat, steps: 20000, trainable: ["net.unet.*lora*"], loss_weights: {l2: 1.0, lpips: 2.0}, lr: 5.0e-5}
          - {name: mff, steps: -1, trainable: ["net.mff.*", "disc.*"], loss_weights: {l2: 1.0, gan: 0.1}, lr: 1.0e-5}
```

The contract with the LightningModule:

- The module declares `loss_names`, every loss it can compute; a stage weighting any other name is a
  `ValueError` when training starts, so a typo never silently turns a loss off.
- The callback sets `pl_module.stage` (the active `Stage`) and `pl_module.loss_weights` (its dict; a loss
  missing from it is off) and leaves `requires_grad` True on exactly the parameters whose
  `named_parameters()` names match the stage's `trainable` patterns (fnmatch; `*` also crosses dots).
- `configure_optimizers` builds every optimizer from the parameters that require grad, taking the LR and
  settings of its main optimizer from `self.stage.lr` / `self.stage.optimizer_kwargs` (other optimizers,
  e.g. a discriminator's, keep the module's own settings). At each switch the callback calls it again
  (`trainer.strategy.setup_optimizers`) and hands each parameter's optimizer state (momentum, Adam
  moments) over to the new optimizers, so a discriminator optimizer of a manual-optimization GAN module
  keeps its state across switches. LR schedulers are rebuilt with the optimizers and restart.
- The networks must exist when the callback's `setup` runs, which Lightning calls before the module's own
  `setup` and `configure_model`: build them in `__init__`.

Steps count `trainer.global_step`, as `max_steps` does: in manual optimization every `optimizer.step()`
counts, so a GAN module stepping a generator and a discriminator per batch advances 2 steps per batch.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy, XLAStrategy
from lightning.pytorch.utilities import rank_zero_info

# Segments that FSDP (and its activation checkpointing) insert into the names of the parameters they wrap.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name without the wrapper segments FSDP inserts, as stage patterns are written."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


@dataclass
class Stage:
    """One training stage.

    Args:
        name: the stage's name, as papers call it ("afat", "distillation").
        steps: its length in `trainer.global_step` steps; -1 (last stage only) means until training ends.
        trainable: fnmatch patterns over the LightningModule's parameter names, e.g.
            ["net.unet.*lora*", "net.mff.*"]; every pattern must match at least one parameter.
        loss_weights: loss name -> weight; a loss absent here is off during the stage.
        lr: learning rate of the module's main optimizer during the stage.
        optimizer_kwargs: other settings of that optimizer (e.g. weight_decay, betas).
    """

    name: str
    steps: int
    trainable: list[str]
    loss_weights: dict[str, float] = field(default_factory=dict)
    lr: float = 1e-4
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps <= 0 and self.steps != -1:
            raise ValueError(f"stage {self.name!r}: steps must be positive or -1, got {self.steps}")
        if not self.trainable:
            raise ValueError(f"stage {self.name!r}: trainable must name at least one parameter pattern")

    def trains(self, parameter_name: str) -> bool:
        """Whether the parameter called `parameter_name` trains during this stage."""
        return any(fnmatch.fnmatchcase(parameter_name, pattern) for pattern in self.trainable)


class StageSchedule(Callback):
    """Runs `stages` one after the other, switching at cumulative step milestones.

    At each switch it freezes every parameter of the LightningModule, unfreezes those of the new stage,
    sets `pl_module.stage` / `pl_module.loss_weights`, rebuilds the optimizers and logs the stage index as
    "stage". A schedule whose stages all have finite `steps` ends training after the last one. Its state
    (the active stage) is saved in checkpoints, and resuming applies that stage before Lightning rebuilds
    the optimizers and loads their states, so these match. It runs under single-device, DDP and FSDP
    strategies; under DDP the module is re-wrapped at each switch, since DistributedDataParallel only
    synchronises the parameters that required grad when it wrapped the module; FSDP needs
    `use_orig_params=True`, with which it re-reads the original parameters' requires_grad at every forward,
    and patterns match the names without FSDP's wrapper segments (`unwrapped_name`).

    Args:
        stages: the stages in order; only the last may have steps = -1.
    """

    def __init__(self, stages: list[Stage]) -> None:
        if not stages:
            raise ValueError("stages must list at least one Stage")
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if any(stage.steps == -1 for stage in stages[:-1]):
            raise ValueError("only the last stage may have steps = -1")
        self.stages = list(stages)
        ends, total = [], 0
        for stage in self.stages:
            total = math.inf if stage.steps == -1 else total + stage.steps
            ends.append(total)
        # ends[i]: the global step at which stage i is over.
        self.ends: list[float] = ends
        self.current_index = 0
        self._trainer: Trainer | None = None
        self._pl_module: LightningModule | None = None

    @property
    def current_stage(self) -> Stage:
        """The active stage."""
        return self.stages[self.current_index]

    def stage_index_at(self, step: int) -> int:
        """Index of the stage that global step `step` belongs to (the last one past the end)."""
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.stages) - 1)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Kept for every trainer function: restoring a checkpoint (`load_state_dict`) applies its stage.
        self._trainer, self._pl_module = trainer, pl_module
        if stage != "fit":
            return
        strategy = trainer.strategy
        # Rebuilding optimizers (and re-wrapping DDP) mid-run is only sound where the strategy builds
        # them as plain torch optimizers over the module's parameters.
        if isinstance(strategy, FSDPStrategy):
            # FSDP keeps the original parameters (and their requires_grad, read at every forward) only with
            # use_orig_params; without it the optimizers see flat parameters frozen as they were wrapped.
            if not strategy.kwargs.get("use_orig_params"):
                raise ValueError("StageSchedule under FSDP needs FSDPStrategy(use_orig_params=True): stages switch "
                                 "requires_grad on the original parameters")
        elif isinstance(strategy, (DeepSpeedStrategy, XLAStrategy)) or not isinstance(
            strategy, (SingleDeviceStrategy, DDPStrategy)
        ):
            raise ValueError(f"StageSchedule supports single-device, DDP and FSDP strategies, got "
                             f"{type(strategy).__name__}")
        names = [name for name, _ in pl_module.named_parameters()]
        known_losses = tuple(pl_module.loss_names)
        for schedule_stage in self.stages:
            unknown = sorted(set(schedule_stage.loss_weights) - set(known_losses))
            if unknown:
                raise ValueError(
                    f"stage {schedule_stage.name!r} weights unknown loss(es) {', '.join(unknown)}; "
                    f"{type(pl_module).__name__} computes {', '.join(known_losses)}"
                )
            for pattern in schedule_stage.trainable:
                if not fnmatch.filter(names, pattern):
                    raise ValueError(
                        f"stage {schedule_stage.name!r}: pattern {pattern!r} matches no parameter of "
                        f"{type(pl_module).__name__}"
                    )
        self._apply(0)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        index = self.stage_index_at(trainer.global_step)
        if index != self.current_index:
            self._apply(index)
            rank_zero_info(
                f"StageSchedule: stage {index + 1}/{len(self.stages)} {self.current_stage.name!r} "
                f"starts at step {trainer.global_step}"
            )
        pl_module.log("stage", float(self.current_index), on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.ends[-1]:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.current_index, "name": self.current_stage.name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        index, name = state_dict["index"], state_dict["name"]
        if index >= len(self.stages) or self.stages[index].name != name:
            raise ValueError(
                f"checkpoint was saved in stage {index} {name!r}, which this schedule "
                f"({[stage.name for stage in self.stages]}) does not have"
            )
        # Lightning restores callbacks before it builds the optimizers (except strategies that restore
        # after setup, whose optimizers `_apply` rebuilds), so the optimizer states it loads next fit
        # the parameter groups of this stage.
        self._apply(index)

    def _apply(self, index: int) -> None:
        trainer, pl_module = self._trainer, self._pl_module
        stage = self.stages[index]
        for name, parameter in pl_module.named_parameters():
            parameter.requires_grad_(stage.trains(unwrapped_name(name)))
        pl_module.stage = stage
        pl_module.loss_weights = dict(stage.loss_weights)
        self.current_index = index
        if trainer.optimizers:
            self._rebuild_optimizers(trainer, pl_module)

    @staticmethod
    def _rebuild_optimizers(trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = pl_module
            strategy.configure_ddp()
        previous_state = {
            parameter: state for optimizer in trainer.optimizers for parameter, state in optimizer.state.items()
        }
        strategy.setup_optimizers(trainer)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter in previous_state:
                        optimizer.state[parameter] = previous_state[parameter]
