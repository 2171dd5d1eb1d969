"""zoo.components.memo: a clip's per-step constants stored once, handed back to the bit, and the denoisers'
step-only modules found in diffusers' UNet and ControlNet."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

import zoo
from zoo.bench.pipeline import DispatchCounter
from zoo.components.memo import UNIT, StepMemo, memoise_denoiser
from zoo.stream_diffvsr.network import StreamDiffVSRConfig


class Counted(nn.Module):
    """`x * weight`, counting its evaluations."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.weight


def test_each_step_is_computed_once_and_handed_back() -> None:
    per_step, once = Counted(2.0), Counted(3.0)
    memo = StepMemo()
    memo.add(per_step)
    memo.add(once, per_step=False)
    x1, x2 = torch.tensor([1.0]), torch.tensor([5.0])
    with torch.no_grad(), memo.installed():
        with memo.step(10):
            assert per_step(x1).item() == 2.0 and once(x1).item() == 3.0
        with memo.step(20):
            assert per_step(x2).item() == 10.0
            assert once(x2).item() == 3.0  # step-free: the clip's first output, whatever the step
        for _ in range(3):  # later frames: the stored tensors, no evaluation
            with memo.step(10):
                assert per_step(x2).item() == 2.0
            with memo.step(20):
                assert per_step(x1).item() == 10.0
    assert (per_step.calls, once.calls, memo.hits) == (2, 1, 7)
    assert "forward" not in vars(per_step) and per_step(x1).item() == 2.0  # uninstalled: the module computes


def test_misuse_is_refused_in_one_sentence() -> None:
    module = Counted(2.0)
    memo = StepMemo()
    memo.add(module)
    with pytest.raises(RuntimeError, match="StepMemo is for inference"), memo.installed():
        pass
    with torch.no_grad(), memo.installed():
        with pytest.raises(RuntimeError, match=r"per-step Counted was called outside StepMemo\.step"):
            module(torch.ones(1))
        with memo.step(0):
            module(torch.ones(1))
            with pytest.raises(RuntimeError, match=r"got inputs .* a StepMemo serves one clip of one size"):
                module(torch.ones(2))
        module.forward = module.forward  # something else holds the instance forward now
        with pytest.raises(RuntimeError, match="already has its own forward"), memo.installed():
            pass


def test_settings_hold_while_installed_only() -> None:
    holder = nn.Module()
    holder.flag = False
    memo = StepMemo()
    memo.set_while_installed(holder, "flag", True)
    with torch.no_grad(), memo.installed():
        assert holder.flag is True
    assert holder.flag is False


def _tiny_unet(**changes) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**StreamDiffVSRConfig.tiny().unet, **changes}).eval()


def _unet_steps(unet: nn.Module, memo: StepMemo | None, sample: torch.Tensor, prompt: torch.Tensor,
                timesteps: list[int], **kwargs) -> list[torch.Tensor]:
    outputs = []
    for t in timesteps:
        timestep = torch.full((1,), t)
        if memo is None:
            outputs.append(unet(sample, timestep, encoder_hidden_states=prompt, **kwargs).sample)
            continue
        with memo.step(t):
            outputs.append(unet(sample, timestep, encoder_hidden_states=prompt, **kwargs).sample)
    return outputs


@pytest.mark.parametrize("fused", [False, True])
def test_a_memoised_unet_gives_the_same_bits_over_frames(fused: bool) -> None:
    unet = _tiny_unet()
    if fused:
        unet.fuse_qkv_projections()
    memo = StepMemo()
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    cross = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert resnets and cross
    # time_proj, time_embedding, one projection per ResNet, k and v (or the fused kv) per cross-attention
    assert memoise_denoiser(memo, unet) == 2 + len(resnets) + (1 if fused else 2) * len(cross)
    sample, prompt = torch.randn(1, 7, 8, 8), torch.randn(1, 4, 16)
    timesteps = [999, 749, 499, 249]
    with torch.no_grad():
        expected = _unet_steps(unet, None, sample, prompt, timesteps)
        with memo.installed():
            for _ in range(3):  # three frames: the first fills the memo, the others read it
                got = _unet_steps(unet, memo, sample, prompt, timesteps)
                assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # 3 frames x 4 steps: a per-step module computes at the first frame's 4 steps, a step-free one once
    per_step, step_free = 2 + len(resnets), (1 if fused else 2) * len(cross)
    assert memo.hits == (12 - 4) * per_step + (12 - 1) * step_free


def test_the_step_key_reaches_the_stored_outputs() -> None:
    """Keying every step alike would hand step 999's time embedding to the later steps: the output changes."""
    unet = _tiny_unet()
    memo = StepMemo()
    memoise_denoiser(memo, unet)
    sample, prompt = torch.randn(1, 7, 8, 8), torch.randn(1, 4, 16)
    with torch.no_grad():
        expected = _unet_steps(unet, None, sample, prompt, [999, 249])
        with memo.installed():
            outputs = []
            for t in (999, 249):
                with memo.step("one key for all"):
                    outputs.append(unet(sample, torch.full((1,), t), encoder_hidden_states=prompt).sample)
    assert torch.equal(outputs[0], expected[0]) and not torch.allclose(outputs[1], expected[1])


def test_a_noise_level_class_embedding_keeps_time_proj_computed() -> None:
    # The x4 upscaler's noise level goes through `time_proj` as well: one stored output per step would answer both.
    unet = _tiny_unet(num_class_embeds=1000)
    memo = StepMemo()
    memoise_denoiser(memo, unet)
    registered = {id(module) for module, _, _ in memo._entries}
    assert id(unet.time_proj) not in registered and id(unet.time_embedding) in registered
    sample, prompt, labels = torch.randn(1, 7, 8, 8), torch.randn(1, 4, 16), torch.full((1,), 20)
    with torch.no_grad():
        expected = _unet_steps(unet, None, sample, prompt, [999, 249], class_labels=labels)
        with memo.installed():
            for _ in range(2):
                got = _unet_steps(unet, memo, sample, prompt, [999, 249], class_labels=labels)
                assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_controlnet_time_modules_are_memoised() -> None:
    torch.manual_seed(0)
    config = StreamDiffVSRConfig.tiny()
    controlnet = ControlNetModel(**config.controlnet).eval()
    memo = StepMemo()
    resnets = sum(isinstance(m, ResnetBlock2D) for m in controlnet.modules())
    cross = sum(isinstance(m, Attention) and m.is_cross_attention for m in controlnet.modules())
    assert memoise_denoiser(memo, controlnet) == 2 + resnets + 2 * cross


def test_a_memoised_stream_equals_a_computed_one_to_the_bit() -> None:
    torch.manual_seed(0)
    up = zoo.load("stream_diffvsr", pretrained=False, variant="tiny")
    frames = torch.rand(4, 3, 16, 16)
    session = up.session()
    memoised = [session.push(frame) for frame in frames]
    assert session.memo.hits > 0 and "forward" not in vars(up.net.unet.time_embedding)
    computed = up.session()
    computed.memo = StepMemo()  # registers nothing: every module computes
    reference = [computed.push(frame) for frame in frames]
    assert all(torch.equal(a, b) for a, b in zip(memoised, reference, strict=True))


def test_unit_is_a_scale_of_one_that_dispatches_nothing() -> None:
    x = torch.randn(3)
    with DispatchCounter() as counter:
        assert x * UNIT is x and x / UNIT is x
    assert counter.launches == 0
    with pytest.raises(TypeError):
        UNIT * x  # only as the right operand, where diffusers puts its scales


def _ops(fn) -> collections.Counter:
    ops = collections.Counter()

    class Recorder(DispatchCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[str(func)] += 1
            return super().__torch_dispatch__(func, types, args, kwargs)

    with torch.no_grad(), Recorder():
        fn()
    return ops


def test_output_scales_of_one_are_not_divided_by_while_installed() -> None:
    unet = _tiny_unet()
    unet.fuse_qkv_projections()
    memo = StepMemo()
    memoise_denoiser(memo, unet)
    sample, prompt = torch.randn(1, 7, 8, 8), torch.randn(1, 4, 16)
    run = functools.partial(_unet_steps, unet, memo, sample, prompt, [999])
    plain = _ops(functools.partial(_unet_steps, unet, None, sample, prompt, [999]))
    blocks = [m for m in unet.modules() if type(m) is ResnetBlock2D or isinstance(m, Attention)]
    assert plain["aten.div.Tensor"] >= len(blocks)  # diffusers divides by each block's scale of 1
    with torch.no_grad(), memo.installed():
        assert all(getattr(m, "output_scale_factor", getattr(m, "rescale_output_factor", None)) is UNIT
                   for m in blocks)
        assert _ops(run)["aten.div.Tensor"] == plain["aten.div.Tensor"] - len(blocks)
    assert all(m.output_scale_factor == 1.0 for m in blocks if type(m) is ResnetBlock2D)  # restored


def test_other_output_scales_are_kept() -> None:
    unet = _tiny_unet(mid_block_scale_factor=2.0)
    memo = StepMemo()
    memoise_denoiser(memo, unet)
    sample, prompt = torch.randn(1, 7, 8, 8), torch.randn(1, 4, 16)
    scaled = [m for m in unet.modules() if type(m) is ResnetBlock2D and m.output_scale_factor == 2.0]
    assert len(scaled) == 2  # the mid block's
    with torch.no_grad():
        expected = _unet_steps(unet, None, sample, prompt, [999, 249])
        with memo.installed():
            assert all(m.output_scale_factor == 2.0 for m in scaled)
            got = _unet_steps(unet, memo, sample, prompt, [999, 249])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_memoised_stream_hands_the_controlnet_residuals_over_unscaled() -> None:
    torch.manual_seed(0)
    up = zoo.load("stream_diffvsr", pretrained=False, variant="tiny")
    controlnet = up.net.controlnet
    zero_conv, residuals = [], []
    controlnet.controlnet_down_blocks[0].register_forward_hook(lambda m, a, out: zero_conv.append(out))
    controlnet.register_forward_hook(lambda m, a, out: residuals.append(out[0][0]))
    session = up.session()
    for frame in torch.rand(2, 3, 16, 16):
        session.push(frame)
    # No multiplication by the conditioning scale of 1: the zero convolution's output is the residual itself.
    assert len(residuals) == 4 and all(r is z for r, z in zip(residuals, zero_conv, strict=True))
