"""Shared fixtures of the OSDEnhancer tests: one tiny upscaler with non-zero experts and decoder blocks."""

from __future__ import annotations

import pytest
import torch

from zoo.osdenhancer.network import OSDEnhancerConfig
from zoo.osdenhancer.pipeline import OSDEnhancerUpscaler


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a small random value, so the zero-initialised expert and decoder parts act too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 1
            scale = 0.3 / fan_in**0.5 if param.ndim > 1 else 0.05
            noise = torch.randn(param.shape, generator=generator) * scale
            # Normalisation weights near 1: small ones would shrink activations into slow denormals.
            is_gain = param.ndim == 1 and "norm" in name and name.endswith("weight")
            param.copy_(noise + (1.0 if is_gain or name.endswith("temperature") else 0.0))
    return module


@pytest.fixture(scope="module")
def tiny_upscaler() -> OSDEnhancerUpscaler:
    """A tiny upscaler whose every weight, TR/SE `lora_B` and `project_out` included, is random and non-zero."""
    torch.manual_seed(0)
    upscaler = OSDEnhancerUpscaler(OSDEnhancerConfig.tiny()).eval()
    randomise_(upscaler.net, 0)
    upscaler.net.prompt_embedding.normal_(generator=torch.Generator().manual_seed(1))
    return upscaler
