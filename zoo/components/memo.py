"""`StepMemo`: what a fixed-step sampler's denoisers recompute at every frame, computed once per clip.

A distilled sampler runs the same few timesteps at every frame of a clip, with one stored prompt
embedding. Inside a diffusers UNet or ControlNet some modules see inputs that depend on nothing
else:

- the sinusoidal timestep features (`time_proj`) and the time-embedding MLP (`time_embedding`);
- each ResNet block's projection of that embedding (SiLU, then `time_emb_proj`);
- the key and value projections of the prompt in every cross-attention.

Eager PyTorch recomputes them at every step of every frame: for Stream-DiffVSR's UNet and ControlNet
at 4 steps, about 500 operator launches per frame, each a GPU kernel. `StepMemo` computes each once
per clip and step, and hands the stored tensor back afterwards. While it is installed, diffusers'
divisions by an output scale of 1 (every attention's `rescale_output_factor`, every ResNet block's
`output_scale_factor`) dispatch nothing either (`UNIT`): another 312 launches per Stream-DiffVSR frame.
`unit_output_scales` does the same for a network with nothing to memoise, such as OS-DiffVSR's VAE (37
launches and 7.9 GB of memory traffic per 720p frame). It is for eager inference only:
compiled networks fuse those small operations into their neighbours, and a dictionary lookup
inside a traced forward would cost a graph per step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

_STEP_FREE = object()
"""The key of outputs that depend on no step (the prompt's keys and values)."""


class _Unit:
    """1 as a scale that dispatches nothing: `x * UNIT` and `x / UNIT` are `x` itself.

    diffusers multiplies or divides by its scale factors even when they are 1 (`hidden_states /
    attn.rescale_output_factor`, `(input_tensor + hidden_states) / self.output_scale_factor`, the
    ControlNet's `sample * conditioning_scale`): a kernel launch each on a GPU, for an exact no-op. A
    tensor does not know this type, so Python asks it (`__rmul__`, `__rtruediv__`), and it hands `x`
    back. Only for eager runs: a compiled graph drops such operations itself.
    """

    def __rmul__(self, other: Any) -> Any:
        return other

    __rtruediv__ = __rmul__

    def __repr__(self) -> str:
        return "UNIT"


UNIT = _Unit()


class StepMemo:
    """Outputs of registered modules, stored per sampler step at their first call in a clip.

    While `installed()` lasts, calling a registered module inside `step(key)` returns the tensor it
    computed at its first call under the same `key` (or, for a step-free module, at its first call).
    A new memo belongs to one clip: the pipeline holds it for a stream and drops it at the stream's
    end. Every call checks its inputs' shapes, dtypes and devices against those of the stored call
    and raises on a difference; the values are the caller's contract: a registered module must get
    the same values whenever the key is the same (the same timestep, the same stored prompt).

    Attributes:
        hits: calls answered from the memo since it was made.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[nn.Module, Callable[..., Tensor], bool]] = []
        self._settings: list[tuple[nn.Module, str, Any]] = []
        self._outputs: dict[tuple[int, Hashable], tuple[Tensor, tuple]] = {}
        self._step: Hashable | None = None
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, module: nn.Module, compute: Callable[..., Tensor] | None = None, *, per_step: bool = True) -> None:
        """Register `module`: its calls are answered by `compute(*args)` (default: its class's `forward`) once.

        Args:
            module: the module to memoise.
            compute: what a call computes the first time; the module's own forward when None.
            per_step: the output depends on the step (`step(key)`); else on nothing (one output per clip).
        """
        if compute is None:
            compute = type(module).forward.__get__(module)
        self._entries.append((module, compute, per_step))

    def set_while_installed(self, module: nn.Module, name: str, value: Any) -> None:
        """Give `module.name` the value `value` while the memo is installed (restored after)."""
        self._settings.append((module, name, value))

    def unit_while_installed(self, module: nn.Module, name: str) -> None:
        """Make the scale `module.name` `UNIT` while installed if it is 1 (an exact no-op); other scales stay."""
        if getattr(module, name) == 1:
            self.set_while_installed(module, name, UNIT)

    @contextlib.contextmanager
    def step(self, key: Hashable) -> Iterator[None]:
        """The sampler step whose outputs the registered per-step modules store and return (e.g. its timestep)."""
        previous, self._step = self._step, key
        try:
            yield
        finally:
            self._step = previous

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepMemo]:
        """Route the registered modules' calls through the memo (an instance `forward`) while the context lasts."""
        if torch.is_grad_enabled():
            raise RuntimeError("StepMemo is for inference: it would hand stored tensors to a graph that needs "
                               "gradients; run under torch.no_grad()")
        taken = [module for module, _, _ in self._entries if "forward" in vars(module)]
        if taken:
            raise RuntimeError(f"a {type(taken[0]).__name__} to memoise already has its own forward (compiled, "
                               f"hooked, or memoised by another memo); StepMemo runs on plain eager modules only")
        previous = [(module, name, getattr(module, name)) for module, name, _ in self._settings]
        try:
            for module, name, value in self._settings:
                setattr(module, name, value)
            for module, compute, per_step in self._entries:
                module.forward = functools.partial(self._call, module, compute, per_step)
            yield self
        finally:
            for module, _, _ in self._entries:
                vars(module).pop("forward", None)
            for module, name, value in previous:
                setattr(module, name, value)

    def _call(self, module: nn.Module, compute: Callable[..., Tensor], per_step: bool, *args: Any,
              **kwargs: Any) -> Tensor:
        if per_step and self._step is None:
            raise RuntimeError(f"a per-step {type(module).__name__} was called outside StepMemo.step()")
        key = (id(module), self._step if per_step else _STEP_FREE)
        signature = tuple((a.shape, a.dtype, a.device) if isinstance(a, Tensor) else a
                          for a in (*args, *sorted(kwargs.items())))
        if key not in self._outputs:
            self._outputs[key] = (compute(*args, **kwargs), signature)
            return self._outputs[key][0]
        output, stored = self._outputs[key]
        if signature != stored:
            raise RuntimeError(f"a memoised {type(module).__name__} got inputs {signature} at a step whose stored "
                               f"output came from {stored}: a StepMemo serves one clip of one size and dtype")
        self.hits += 1
        return output


def _time_projection(resnet: ResnetBlock2D, temb: Tensor) -> Tensor:
    """What `ResnetBlock2D.forward` computes from `temb` before adding it (with `skip_time_act` False)."""
    return type(resnet.time_emb_proj).forward(resnet.time_emb_proj, resnet.nonlinearity(temb))


def memoise_denoiser(memo: StepMemo, model: nn.Module) -> int:
    """Register the step-only modules of a diffusers UNet or ControlNet in `memo`; returns how many.

    The model must be called inside `memo.step(timestep)` and always with the same prompt embedding
    (`encoder_hidden_states`) while installed: the timestep features, the time-embedding MLP and each
    ResNet block's time projection are stored per step, and the prompt's keys and values in every
    cross-attention once. Attention with other processors than diffusers' plain or fused SDPA ones
    is left alone, as are ResNet blocks with another time-embedding norm than the default sum. Output
    scales of 1 of the SDPA attentions and the ResNet blocks become `UNIT` (not counted in the return value).
    """
    count = len(memo)
    # A UNet with a timestep-type class embedding (the x4 upscaler's noise level) calls `time_proj` twice per
    # step, on the timestep and on the class labels: one stored output per step would answer both.
    if getattr(model, "class_embedding", None) is None and isinstance(getattr(model, "time_proj", None), nn.Module):
        memo.add(model.time_proj)
    if isinstance(getattr(model, "time_embedding", None), nn.Module):
        memo.add(model.time_embedding)
    for module in model.modules():
        if (isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None and not module.skip_time_act
                and module.time_embedding_norm == "default"):
            # The SiLU moves into the stored projection: the block is told to skip its own while installed.
            memo.add(module.time_emb_proj, functools.partial(_time_projection, module))
            memo.set_while_installed(module, "skip_time_act", True)
        if isinstance(module, Attention) and type(module.processor) in (AttnProcessor2_0, FusedAttnProcessor2_0):
            if not module.is_cross_attention:
                continue
            if type(module.processor) is FusedAttnProcessor2_0 and getattr(module, "fused_projections", False):
                memo.add(module.to_kv, per_step=False)
            elif type(module.processor) is AttnProcessor2_0:
                memo.add(module.to_k, per_step=False)
                memo.add(module.to_v, per_step=False)
    unit_output_scales(memo, model)
    return len(memo) - count


def unit_output_scales(memo: StepMemo, model: nn.Module) -> None:
    """Make the output scales of 1 in `model`'s diffusers ResNet blocks and SDPA attentions `UNIT` while `memo` is
    installed: `x / 1` is `x` to the bit, and each division is a pass over a whole activation (at 720p, SD's VAE
    divides 3.97 GB of activations per frame in 34 ResNet blocks)."""
    for module in model.modules():
        if type(module) is ResnetBlock2D:
            memo.unit_while_installed(module, "output_scale_factor")
        elif isinstance(module, Attention) and type(module.processor) in (AttnProcessor2_0, FusedAttnProcessor2_0):
            memo.unit_while_installed(module, "rescale_output_factor")
