"""`ZooModule`: what every paper's LightningModule shares with the hub.

A checkpoint written by a `ZooModule` records its hub name, so `zoo hub export CKPT DIR` knows
which LightningModule to rebuild; `to_upscaler()` turns the trained module into the
`VideoUpscaler` that the hub loads.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch import LightningModule

import zoo
from zoo.components.upscaler import VideoUpscaler


class ZooModule(LightningModule):
    """Base LightningModule of the zoo; subclasses hold their networks in `self.net`."""

    hub_name: ClassVar[str]
    loss_names: ClassVar[tuple[str, ...]]
    """Every loss the module can compute; stages may weight only these (`StageSchedule` checks)."""

    def to_upscaler(self) -> VideoUpscaler:
        """The inference `VideoUpscaler` carrying this module's current weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_upscaler()")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["zoo"] = {"hub_name": self.hub_name, "version": zoo.__version__}
