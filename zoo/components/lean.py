"""Shared mechanics of the lean modules: diffusers modules whose forward moves fewer bytes, swapped in by class.

PS-SR's Wan VAE (`zoo.pssr.network.use_lean_wan_modules`) and OSDEnhancer's CogVideoX VAE
(`zoo.osdenhancer.network.use_lean_resnet_blocks`) keep diffusers' modules, parameters and names, so published
weights load as before; only the class, and so the forward, changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor


def runs_on_the_cpu(*tensors: Tensor) -> bool:
    """Whether an operator on `tensors` (say, its input and a module's weight) runs on real CPU tensors, for which
    a lean module may pick another kernel or keep diffusers' path.

    Not under `zoo bench`'s counts, which model a CUDA run (`zoo.bench.pipeline.Roofline`) with fake weights (a real
    input may enter them), nor while `torch.compile` traces, whose inductor makes kernels of its own.
    """
    return (all(t.device.type == "cpu" and not isinstance(t, FakeTensor) for t in tensors)
            and not torch.compiler.is_compiling())


def swap_classes(root: nn.Module, lean: dict[type[nn.Module], type[nn.Module]]) -> int:
    """Give each module under `root` whose exact class is a key of `lean` that key's value; returns how many."""
    swapped = 0
    for module in root.modules():
        cls = lean.get(type(module))
        if cls is not None:
            module.__class__ = cls
            swapped += 1
    return swapped
