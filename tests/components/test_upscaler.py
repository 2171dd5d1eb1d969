"""zoo.components.upscaler: input validation, config round trips, and the hooks callers use (options, colour
fix, memory estimates, default tiles)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import zoo
import zoo.components.upscaler as upscaler_module
from zoo.components.color import wavelet_color_fix
from zoo.components.upscaler import (
    MEMORY_HEADROOM,
    MemoryModel,
    VideoUpscaler,
    check_frame,
    check_frames,
    compile_settings,
    config_from_dict,
    config_to_dict,
    use_fast_cuda,
)


@pytest.mark.parametrize(("frames", "message"), [
    (torch.rand(3, 64, 64), r"frames must be \(T, 3, H, W\) in \[0, 1\], got \(3, 64, 64\)"),
    (torch.rand(2, 4, 8, 8), r"got \(2, 4, 8, 8\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "frames must be floats in"),
    (torch.rand(0, 3, 8, 8), "at least one frame"),
    (torch.full((1, 3, 4, 4), 255.0), r"got values in \[255, 255\]"),
    ([1, 2, 3], r"got list"),
])
def test_check_frames_rejects(frames, message):
    with pytest.raises(ValueError, match=message):
        check_frames(frames)


def test_check_frame_accepts_and_rejects():
    frame = torch.rand(3, 5, 7)
    assert check_frame(frame) is frame
    with pytest.raises(ValueError, match=r"a frame must be \(3, H, W\)"):
        check_frame(torch.rand(1, 3, 5, 7))


@dataclasses.dataclass
class Inner:
    channels: tuple[int, ...] = (1, 2)
    name: str = "x"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    pair: tuple[int, float] = (1, 2.0)
    optional: Inner | None = None
    scale: float = 1.0


def test_config_round_trip_restores_nested_dataclasses_and_tuples():
    config = Outer(inner=Inner(channels=(8, 16, 32)), optional=Inner(name="y"))
    data = config_to_dict(config)
    assert data["inner"] == {"channels": (8, 16, 32), "name": "x"}
    rebuilt = config_from_dict(Outer, {**data, "inner": {"channels": [8, 16, 32], "name": "x"}})
    assert rebuilt == config and isinstance(rebuilt.inner.channels, tuple)
    with pytest.raises(ValueError, match="Outer has no field"):
        config_from_dict(Outer, {"bogus": 1})


# What callers such as `zoo upscale` need from a pipeline --------------------------------------


@dataclasses.dataclass
class NoConfig:
    pass


class Tiled(VideoUpscaler):
    hub_name = "tiled"
    config_class = NoConfig
    options: ClassVar[dict] = {"tile": None, "tile_overlap": 8, "color_fix": "none", "seed": 0}
    memory = MemoryModel(frame=100.0, tile=1000.0)
    scale = 2

    def __init__(self, config=None) -> None:
        super().__init__(config or NoConfig())
        self.weight = torch.nn.Parameter(torch.zeros(()))


def test_shared_options_are_checked_by_value() -> None:
    up = Tiled()
    for options, message in [({"color_fix": "sepia"}, "color_fix must be one of none, wavelet, adain, got 'sepia'"),
                             ({"tile": 0}, "tile must be a positive int or None, got 0"),
                             ({"tile_overlap": -1}, "tile_overlap must be an int >= 0, got -1"),
                             ({"seed": 1.5}, "seed must be an int >= 0, got 1.5")]:
        with pytest.raises(ValueError, match=message):
            up.configure(**options)
        up.configure(**Tiled.options)


def test_fix_colors_by_option() -> None:
    up = Tiled()
    lr = torch.rand(1, 3, 4, 4)
    hr = torch.rand(1, 3, 8, 8)
    assert up.fix_colors(hr, lr) is hr  # "none"
    up.configure(color_fix="adain")
    # AdaIN on constant images: a flat target takes the source's mean. Source 0.25 everywhere (its
    # bicubic upsampling too), target 0.75: out = (0.75 - 0.75) / eps * 0 + 0.25 = 0.25.
    fixed = up.fix_colors(torch.full((1, 3, 8, 8), 0.75), torch.full((1, 3, 4, 4), 0.25))
    assert torch.allclose(fixed, torch.full((1, 3, 8, 8), 0.25))
    up.configure(color_fix="wavelet")
    source = torch.nn.functional.interpolate(lr, size=(8, 8), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.equal(up.fix_colors(hr, lr), wavelet_color_fix(hr, source).clamp(0, 1))
    # Swapped arguments give another image: the source's colours are what is kept.
    assert not torch.allclose(up.fix_colors(hr, lr), up.fix_colors(source, hr[..., ::2, ::2]))
    assert up.fix_colors(hr.bfloat16(), lr.bfloat16()).dtype == torch.bfloat16  # computed in float32


def test_memory_estimate_by_hand() -> None:
    up = Tiled()
    # 30 x 40 frame, whole: max(100 * 1200, 1000 * 1200) = 1,200,000 bytes at fp32.
    assert up.estimate_memory(30, 40) == 1_200_000
    up.configure(tile=16)
    # Tiles of 16 x 16: max(100 * 1200, 1000 * 256) = 256,000; bf16 halves it.
    assert up.estimate_memory(30, 40) == 256_000
    assert up.to(torch.bfloat16).estimate_memory(30, 40) == 128_000
    up.configure(tile=8)  # 1000 * 64 = 64,000 < 100 * 1200: the whole-frame stage is the peak
    assert up.to(torch.float32).estimate_memory(30, 40) == 120_000


def test_default_options_pick_the_largest_tile_that_fits() -> None:
    up = Tiled()
    # 200 x 300 frame: whole frames need max(100, 1000) * 60,000 = 60 MB.
    assert up.default_options(200, 300, free_bytes=int(60e6 / MEMORY_HEADROOM) + 1) == {"tile": None}
    # 30 MB free, 24 MB budget (the frame stage needs 6 MB): 24,000 tile pixels at most;
    # 256^2 = 65,536 and 192^2 = 36,864 do not fit, 128^2 = 16,384 does.
    assert up.default_options(200, 300, free_bytes=30_000_000) == {"tile": 128}
    assert up.default_options(200, 300, free_bytes=1) == {"tile": 64}  # nothing fits: the smallest
    assert up.tile is None  # trying sizes leaves the options as they were
    assert VideoUpscaler.default_options(up, 10, 10, 1) == {"tile": None}  # no tile smaller than the frame


def test_tf32_and_cudnn_autotuning_are_set_for_cuda_devices_only() -> None:
    backends = torch.backends
    saved = backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision, backends.cudnn.benchmark
    try:  # process-wide flags (not monkeypatch-able: torch resolves them through __getattr__)
        backends.cuda.matmul.fp32_precision = backends.cudnn.conv.fp32_precision = "ieee"
        backends.cudnn.benchmark = False
        use_fast_cuda(torch.device("cpu"))
        assert backends.cuda.matmul.fp32_precision == "ieee" and not backends.cudnn.benchmark
        use_fast_cuda(torch.device("cuda", 0))
        assert backends.cuda.matmul.fp32_precision == "tf32"
        assert backends.cudnn.conv.fp32_precision == "tf32" and backends.cudnn.benchmark
    finally:
        backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision, backends.cudnn.benchmark = saved


def test_moving_a_pipeline_checks_its_device_for_cuda_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(upscaler_module, "use_fast_cuda", seen.append)
    zoo.load("stream_diffvsr", pretrained=False, variant="tiny").to("cpu")
    assert seen and all(device == torch.device("cpu") for device in seen)


@pytest.mark.parametrize(("value", "settings"), [
    (False, None),
    (True, {"mode": "default", "dynamic": False, "scope": "networks"}),
    ({"backend": "eager"}, {"backend": "eager", "mode": "default", "dynamic": False, "scope": "networks"}),
    ({"mode": "max-autotune-no-cudagraphs", "scope": "step"},
     {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "scope": "step"}),
    ({"options": {"max_autotune": True}}, {"options": {"max_autotune": True}, "dynamic": False, "scope": "networks"}),
])
def test_compile_option_values(value, settings) -> None:
    assert compile_settings(value) == settings


@pytest.mark.parametrize("value", ["yes", None, {"modes": "default"}])
def test_bad_compile_option_values_are_refused(value) -> None:
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        compile_settings(value)


def test_an_unknown_compile_scope_is_refused() -> None:
    with pytest.raises(ValueError, match="compile's scope must be one of networks, step, got 'model'"):
        compile_settings({"scope": "model"})


class Doubler(torch.nn.Module):
    """A module whose work is a method other than `forward`."""

    def twice(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class TwoNetworks(VideoUpscaler):
    """A toy step: `doubler.twice(second(first(x))) + first(x)`, whose `first` runs twice per step with one
    shape."""

    hub_name = "two_networks"
    config_class = NoConfig
    options: ClassVar[dict] = {"compile": False}
    scale = 1

    def __init__(self) -> None:
        super().__init__(NoConfig())
        self.first = torch.nn.Linear(4, 4)
        self.second = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
        self.doubler = Doubler()

    def compile_modules(self) -> list[torch.nn.Module | tuple[torch.nn.Module, str]]:
        return [self.first, self.second, (self.doubler, "twice")]

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.doubler.twice(self.second(self.first(x))) + self.first(x)


def _graph_counter(graphs: list) -> object:
    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(sorted(str(n.target) for n in graph.graph.nodes if n.op == "call_function"))
        return graph.forward
    return backend


def test_networks_scope_compiles_each_network_once_and_restores_it() -> None:
    torch.manual_seed(0)
    up = TwoNetworks()
    x = torch.randn(3, 4)
    expected = up.step(x)
    graphs: list = []
    up.configure(compile={"backend": _graph_counter(graphs)})
    step = up.compiled("step", up.step)
    assert step.fn == up.step  # the step itself runs eagerly; its networks are compiled
    assert all("forward" in vars(m) for m in (up.first, up.second)) and "twice" in vars(up.doubler)
    torch.testing.assert_close(step(x), expected, rtol=0, atol=0)
    # One graph per network or method: `first`, called twice per step, is traced once; the step's add stays
    # eager.
    assert graphs == [["<built-in function linear>"], ["<built-in function gelu>", "<built-in function linear>"],
                      ["<built-in function mul>"]]
    compiling_s = up.compile_seconds["step"]
    step(x)  # nothing new to compile: the call is not counted
    assert len(graphs) == 3 and up.compile_seconds == {"step": compiling_s} and compiling_s > 0
    step(torch.randn(5, 4))  # a new shape compiles every network again, and the call counts
    assert len(graphs) == 6 and up.compile_seconds["step"] > compiling_s
    assert up.state_dict().keys() == TwoNetworks().state_dict().keys()  # no wrapper in the weight names
    up.configure(compile=False)
    assert not any("forward" in vars(m) for m in (up.first, up.second)) and "twice" not in vars(up.doubler)
    assert up.compiled("step", up.step) == up.step


def test_step_scope_compiles_the_whole_step_in_one_graph() -> None:
    up = TwoNetworks()
    x = torch.randn(3, 4)
    graphs: list = []
    up.configure(compile={"backend": _graph_counter(graphs), "scope": "step"})
    step = up.compiled("step", up.step)
    torch.testing.assert_close(step(x), up.step(x), rtol=0, atol=0)
    # Both calls of `first` unrolled into the step's one graph, with the add between the networks.
    assert graphs == [["<built-in function add>", "<built-in function gelu>", *["<built-in function linear>"] * 3,
                       "<built-in function mul>"]]
    assert not any("forward" in vars(m) for m in (up.first, up.second))


def test_networks_scope_needs_networks() -> None:
    up = Tiled()
    up.options = {**Tiled.options, "compile": False}
    up.configure(compile=True)
    with pytest.raises(ValueError, match="tiled names no networks to compile one by one; use compile="):
        up.compiled("step", lambda x: x)


def test_check_weight_names_counts_both_sides() -> None:
    from zoo.components.upscaler import check_weight_names

    check_weight_names(["a", "b"], {"b": 0, "a": 1}, "folder does not match")  # the same names: silent
    with pytest.raises(ValueError, match=r"^folder does not match: 1 missing and 2 unexpected weights, e\.g\. b$"):
        check_weight_names(["a", "b"], ["a", "c", "d"], "folder does not match")
    with pytest.raises(ValueError, match=r": 0 missing and 1 unexpected weights, e\.g\. z$"):
        check_weight_names([], ["z"], "folder does not match")


def test_fuse_projections_fuses_plain_attention_and_keeps_the_output() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    torch.manual_seed(0)
    up = zoo.load("stream_diffvsr", pretrained=False, variant="tiny", merge_lora=False)
    frames = torch.rand(2, 3, 16, 16)
    expected = up(frames)
    attentions = [m for m in up.modules() if isinstance(m, Attention)]
    plain = sum(type(m.processor) is AttnProcessor2_0 for m in attentions)
    assert plain > 0 and not up.projections_fused
    assert up.fuse_projections() == plain
    assert up.projections_fused and all(type(m.processor) is FusedAttnProcessor2_0 for m in attentions)
    # self-attention: one (3C, C) matrix holding q, k, v in order; cross-attention: one (2C, D) holding k, v
    for m in attentions:
        if m.is_cross_attention:
            assert torch.equal(m.to_kv.weight, torch.cat([m.to_k.weight, m.to_v.weight]))
        else:
            assert torch.equal(m.to_qkv.weight, torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight]))
    # The same dot products, blocked differently at most: measured max 0 (tiny stream_diffvsr and osdiffvsr, CPU).
    torch.testing.assert_close(up(frames), expected, rtol=0, atol=1e-5)
    assert up.fuse_projections() == 0  # fused processors are not plain ones: nothing is fused twice


def test_fuse_projections_leaves_custom_attention_processors() -> None:
    up = zoo.load("pssr", pretrained=False, variant="tiny", merge_lora=False)
    assert up.fuse_projections() == 0 and not up.projections_fused


def _layouts(up) -> set[str]:
    """The layouts of the convolution weights whose layouts differ (not 1x1 kernels, which are both)."""
    weights = [m.weight for net in up.channels_last_modules() for m in net.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert weights
    return {"channels_last" if w.is_contiguous(memory_format=torch.channels_last) else "contiguous" for w in weights}


@pytest.mark.parametrize("name", ["osdiffvsr", "stream_diffvsr"])
def test_convolutional_networks_go_channels_last_on_cuda_and_when_compiled(name: str) -> None:
    up = zoo.load(name, pretrained=False, variant="tiny")
    assert _layouts(up) == {"contiguous"}  # CPU eager: PyTorch's default layout and numerics
    up._set_memory_format(torch.device("cuda"))  # what moving the model to a CUDA device does (`_apply`)
    assert _layouts(up) == {"channels_last"}
    up._set_memory_format(torch.device("cpu"))
    assert _layouts(up) == {"contiguous"}
    up.configure(compile={"backend": "eager"})
    assert _layouts(up) == {"channels_last"}
    up.to(torch.float64)  # a move keeps the compiled layout
    assert _layouts(up) == {"channels_last"}
    up.configure(compile=False)
    assert _layouts(up) == {"contiguous"}
    # The `channels_last` option chooses, on CUDA and when compiling too; None gives the default back.
    up.configure(channels_last=False)
    up._set_memory_format(torch.device("cuda"))
    assert _layouts(up) == {"contiguous"}
    up.configure(compile={"backend": "eager"})
    assert _layouts(up) == {"contiguous"}
    up.configure(channels_last=None)
    assert _layouts(up) == {"channels_last"}
    up.configure(compile=False, channels_last=True)
    assert _layouts(up) == {"channels_last"}  # on the CPU, eager, when asked
    up.to(torch.float64)
    assert _layouts(up) == {"channels_last"}
    with pytest.raises(ValueError, match=r"channels_last must be None \(channels-last on CUDA or when compiling\), "
                                         r"True or False, got 'yes'"):
        up.configure(channels_last="yes")
    assert _layouts(up) == {"channels_last"}  # as it was


def misaligned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values in memory 8 bytes past a 64-byte boundary, as safetensors maps a file's weights."""
    buffer = torch.empty(tensor.numel() + 2, dtype=tensor.dtype)
    view = buffer[2:].view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % upscaler_module.CPU_ALIGNMENT == 8
    return view


def test_own_storage_copies_misaligned_weights_only():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 64)
    layer.register_buffer("scale", torch.rand(3))
    expected = {name: value.clone() for name, value in layer.state_dict().items()}
    layer.weight.data = misaligned_copy(layer.weight.data)
    layer.scale = misaligned_copy(layer.scale)
    weight, bias_memory = layer.weight, layer.bias.data_ptr()
    assert upscaler_module.own_storage(layer) is layer
    assert layer.weight is weight  # the same Parameter, in new memory
    assert layer.bias.data_ptr() == bias_memory  # aligned already: not copied
    for name, value in layer.state_dict().items():
        assert value.data_ptr() % upscaler_module.CPU_ALIGNMENT == 0, name
        assert torch.equal(value, expected[name]), name


def test_weights_loaded_from_safetensors_are_aligned_and_give_the_saved_outputs(tmp_path):
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 8))
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    with torch.device("meta"):
        loaded = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 8))
    upscaler_module.load_strict(loaded, tmp_path / "layer.safetensors", assign=True)
    vae = AutoencoderTiny(encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    vae_loaded = upscaler_module.from_pretrained_strict(AutoencoderTiny, tmp_path, "vae")
    for module in (loaded, vae_loaded):
        for name, value in module.state_dict().items():
            assert value.data_ptr() % upscaler_module.CPU_ALIGNMENT == 0, name
    row = torch.randn(1, 16)
    assert torch.equal(loaded(row), layer(row))
    image = torch.rand(1, 3, 16, 16)
    assert torch.equal(vae_loaded.eval().decode(vae_loaded.encode(image).latents).sample,
                       vae.eval().decode(vae.encode(image).latents).sample)
