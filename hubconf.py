"""torch.hub entry points: `torch.hub.load("vsr-zoo/vsr-zoo", "stream_diffvsr")`.

Every entry returns a `zoo.VideoUpscaler`; see `zoo.hub.load` for the arguments.
"""

# What inference imports (torch.hub checks these are installed before loading an entry).
dependencies = ["torch", "torchvision", "diffusers", "transformers", "peft", "huggingface_hub", "safetensors", "av"]

from zoo.hub import load as _load


def osdiffvsr(*, pretrained=True, variant="full", weights=None, device=None, dtype=None):
    """OS-DiffVSR: one-step latent diffusion VSR (SD-2.1 + LoRA) with flow-warped multi-frame fusion, x4."""
    return _load("osdiffvsr", pretrained=pretrained, variant=variant, weights=weights, device=device, dtype=dtype)


def stream_diffvsr(*, pretrained=True, variant="full", weights=None, device=None, dtype=None):
    """Stream-DiffVSR: causal streaming x4 VSR, 4-step DDIM with auto-regressive temporal guidance."""
    return _load("stream_diffvsr", pretrained=pretrained, variant=variant, weights=weights, device=device,
                 dtype=dtype)


def osdenhancer(*, pretrained=True, variant="full", weights=None, device=None, dtype=None):
    """OSDEnhancer: one-step space-time VSR (CogVideoX1.5-5B, TR-SE LoRA experts, deformable decoder), x4 / x2 fps."""
    return _load("osdenhancer", pretrained=pretrained, variant=variant, weights=weights, device=device, dtype=dtype)


def pssr(*, pretrained=True, variant="full", weights=None, device=None, dtype=None):
    """PS-SR: pseudo-single-step x4 VSR, one Wan2.1 base step then pruned-draft steps via speculative diffusion."""
    return _load("pssr", pretrained=pretrained, variant=variant, weights=weights, device=device, dtype=dtype)
