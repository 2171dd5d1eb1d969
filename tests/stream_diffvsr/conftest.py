"""Shared Stream-DiffVSR test helpers: the official checkpoint's parameter names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def _official_vae_keys(config: dict[str, Any]) -> set[str]:
    """Parameter names of the official TemporalAutoencoderTiny (temporal_autoencoder/), enumerated
    from its layer lists: EncoderTiny.layers and TemporalDecoderTiny.layers."""

    def block(prefix: str) -> list[str]:
        names = [f"{prefix}.alpha"]
        names += [f"{prefix}.conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
        names += [f"{prefix}.temporal_processor.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
        return names

    keys, i = [], 0
    for stage, blocks in enumerate(config["num_encoder_blocks"]):
        keys += [f"encoder.layers.{i}.weight"] + ([f"encoder.layers.{i}.bias"] if stage == 0 else [])
        i += 1
        for _ in range(blocks):
            keys += block(f"encoder.layers.{i}")
            i += 1
    keys += [f"encoder.layers.{i}.weight", f"encoder.layers.{i}.bias"]
    keys += ["decoder.layers.0.weight", "decoder.layers.0.bias"]
    i = 2  # conv, activation
    last = len(config["num_decoder_blocks"]) - 1
    for stage, blocks in enumerate(config["num_decoder_blocks"]):
        for _ in range(blocks):
            keys += block(f"decoder.layers.{i}")
            i += 1
        if stage != last:
            i += 1  # nn.Upsample
        keys += [f"decoder.layers.{i}.weight"] + ([f"decoder.layers.{i}.bias"] if stage == last else [])
        i += 1
    return set(keys)


@pytest.fixture
def official_vae_keys() -> Callable[[dict[str, Any]], set[str]]:
    return _official_vae_keys
