"""`ZooModule`: what every paper's LightningModule shares with the hub and with evaluation.

A checkpoint written by a `ZooModule` records its hub name, so `zoo hub export CKPT DIR` knows
which LightningModule to rebuild; `to_upscaler()` turns the trained module into the
`VideoUpscaler` that the hub loads. Its test loop scores that upscaler with the same
`ClipEvaluator` as `zoo evaluate`, so `lightning test -c recipes/<name>.yaml --data
zoo.components.train.evaluation.EvaluationDataModule --data.dataset PATH ...` reports the same numbers.
Every `ZooModule` brings the `TrainingRandomState` callback, so a killed run resumed from its last
checkpoint draws the same random numbers as one never interrupted.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch import Callback, LightningModule

import zoo
from zoo.components.train.evaluation import ClipEvaluator
from zoo.components.train.metrics import VideoMetrics
from zoo.components.train.random_state import TrainingRandomState
from zoo.components.upscaler import VideoUpscaler


class ZooModule(LightningModule):
    """Base LightningModule of the zoo; subclasses hold their networks in `self.net`."""

    hub_name: ClassVar[str]
    loss_names: ClassVar[tuple[str, ...]]
    """Every loss the module can compute; stages may weight only these (`StageSchedule` checks)."""
    test_metrics: ClassVar[tuple[str, ...]] = ("psnr", "ssim", "lpips", "ewarp")
    """What `lightning test` reports (`zoo evaluate --metrics` chooses freely)."""

    def to_upscaler(self) -> VideoUpscaler:
        """The inference `VideoUpscaler` carrying this module's current weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_upscaler()")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["zoo"] = {"hub_name": self.hub_name, "version": zoo.__version__}

    def configure_callbacks(self) -> list[Callback]:
        # Every zoo training run resumes drawing the random numbers an uninterrupted one would draw.
        return [TrainingRandomState()]

    # Test loop: the inference pipeline on a benchmark ---------------------------------------

    def on_test_start(self) -> None:
        upscaler = self.to_upscaler().to(self.device).eval()
        self.test_evaluator = ClipEvaluator(upscaler, VideoMetrics(self.test_metrics).to(self.device))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.test_evaluator.evaluate(batch)

    def on_test_epoch_end(self) -> None:
        scores = self.test_evaluator.metrics.compute()
        self.log_dict({f"test/{name}": value for name, value in scores.items()}, batch_size=1)
