"""zoo bench --model: FLOPs against an analytic count, the group split, every field, refusal when busy."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import zoo.bench.pipeline as bench
from zoo.cli import zoo_main


def test_flops_of_a_known_conv_net_equal_the_analytic_count(toy) -> None:
    upscaler, mode = bench.fake_upscaler("toy", "tiny")  # ToyConfig.tiny(): 4 channels
    frames = [torch.rand(3, 6, 10) for _ in range(3)]
    count = bench.count_stream(upscaler, mode, frames)
    flops, outputs = count.flops, count.frames_out
    # Per frame at 12x20 (x2 bilinear upsampling counts no FLOPs): two 3x3 convolutions, 3 -> 4 -> 3
    # channels, each 2 * C_in * C_out * 9 FLOPs per output pixel.
    per_frame = 2 * (3 * 4 * 9 + 4 * 3 * 9) * 12 * 20
    assert outputs == 3 and flops["total"] == 3 * per_frame


def test_flops_are_split_by_the_module_running_them(toy) -> None:
    upscaler, mode = bench.fake_upscaler("toy", "tiny")
    bench.FLOP_GROUPS["body.0"] = "first conv"
    try:
        flops = bench.count_stream(upscaler, mode, [torch.rand(3, 6, 10)]).flops
    finally:
        del bench.FLOP_GROUPS["body.0"]
    assert flops["first conv"] == 2 * 3 * 4 * 9 * 12 * 20
    assert flops["other"] == flops["total"] - flops["first conv"]


def test_options_that_cast_weights_apply_before_the_weights_turn_fake() -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    options = {"float32_vae": "none", "chunk": 5, "chunk_overlap": 1}
    upscaler, _ = bench.fake_upscaler("pssr", "tiny", torch.bfloat16, options)
    weight = upscaler.net.vae.decoder.conv_out.weight
    assert isinstance(weight, FakeTensor) and weight.dtype == torch.bfloat16 and upscaler.chunk == 5
    upscaler, _ = bench.fake_upscaler("pssr", "tiny", torch.bfloat16, {"float32_vae": "all"})
    assert upscaler.net.vae.decoder.conv_out.weight.dtype == torch.float32


def test_the_memory_peak_follows_each_storage_from_its_making_to_its_last_tensor() -> None:
    host = torch.ones(1000)
    with torch.no_grad(), FakeTensorMode(), bench.DispatchCounter() as counter:
        x = torch.zeros(1000)  # 4,000 bytes
        y = x * 2  # 8,000 live
        del x  # 4,000
        v = y.view(10, 100)  # a view: no new storage
        y.add_(1)  # in place: none
        z = torch.cat([v, v])  # 12,000 live: the peak
        del y  # v still holds y's storage
        assert counter.allocated_bytes == 12_000
        del v, z
        torch.zeros(500, dtype=torch.bfloat16)  # 1,000 bytes, freed at once
        kept = torch.zeros(250, dtype=torch.bfloat16)  # 500 bytes
        host * 2  # host data, computed outside the fake mode: not device memory
    assert (counter.peak_bytes, counter.allocated_bytes) == (12_000, 500)
    del kept
    assert counter.allocated_bytes == 0


def test_roofline_time_is_each_operator_s_flops_or_bytes_at_the_gpu_s_peaks() -> None:
    gpu = bench.Roofline("test", flops_16bit=1e15, flops_32bit=1e12, bandwidth=1e12)
    with torch.no_grad(), FakeTensorMode(), bench.DispatchCounter(gpu) as counter:
        x = torch.zeros(1000)  # writes 4,000 bytes
        y = x * 2  # reads 4,000, writes 4,000
        y.view(10, 100)  # a view: no kernel, no bytes
        one = torch.ones(1)  # 4 bytes
        y + one.expand(1000)  # the expanded operand is one float: 4,000 + 4 + 4,000
        a, b = torch.zeros(64, 64, dtype=torch.bfloat16), torch.ones(64, 64, dtype=torch.bfloat16)  # 8,192 each
        a @ b  # 2 * 64**3 FLOPs at the 16-bit rate, or 3 * 8,192 bytes
        a.float() @ b.float()  # two casts (8,192 + 16,384 bytes each), then FLOPs at the 32-bit rate
    moved = [4_000, 8_000, 4, 8_004, 8_192, 8_192, 3 * 8_192, 24_576, 24_576, 3 * 16_384]
    assert counter.bytes_moved == sum(moved)
    flops = 2 * 64**3
    expected = (sum(moved[:6]) + 2 * 24_576) / 1e12 + max(flops / 1e15, 3 * 8_192 / 1e12) + max(
        flops / 1e12, 3 * 16_384 / 1e12)
    assert counter.roofline_s == pytest.approx(expected, rel=1e-12)
    assert flops / 1e15 < 3 * 8_192 / 1e12 and flops / 1e12 > 3 * 16_384 / 1e12  # bytes bound one, FLOPs the other


def test_a_sampling_operator_counts_the_values_it_can_read_not_its_whole_input() -> None:
    with torch.no_grad(), FakeTensorMode():
        volume, grid = torch.zeros(1, 1, 100, 100), torch.zeros(1, 3, 3, 2)  # 40,000 and 72 bytes
        with bench.DispatchCounter() as counter:
            torch.nn.functional.grid_sample(volume, grid, align_corners=True)  # 9 outputs, 4 taps each
    assert counter.bytes_moved == 4 * 36 + 72 + 36


def test_a_stream_s_memory_peak_counts_its_live_activations_and_not_its_weights(toy) -> None:
    upscaler, mode = bench.fake_upscaler("toy", "tiny")  # 3 -> 4 -> 3 channels, x2
    count = bench.count_stream(upscaler, mode, [torch.rand(3, 4, 4) for _ in range(3)])
    # A device frame at 8x8 output: its upsampled input (3 channels, float32) is alive while the first
    # convolution's output and its ReLU (4 channels each) are (the ReLU's input is freed once it returns),
    # and so is the previous output frame (3 channels), which the consumer holds until the next one comes.
    assert count.peak_bytes == (3 + 4 + 4 + 3) * 8 * 8 * 4
    assert bench.weight_bytes(upscaler) == (4 * 3 * 9 + 4 + 3 * 4 * 9 + 3) * 4


def test_bench_emits_every_field_as_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    zoo_main(["bench", "--model", "stream_diffvsr", "--height", "32", "--width", "48", "--frames", "3",
              "--busy-ok", "--json", str(out), "--vs", "frames=2"])
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    base = result["baseline"]
    for key in ("model", "size", "device", "dtype", "threads", "cores", "load_average", "input", "output",
                "frames_out", "first_frame_ms", "ms_per_frame", "ms_per_output_frame", "peak_host_bytes",
                "flops_per_frame", "tflops",
                "launches_per_frame", "views_per_frame", "count_s", "bound_flops_per_frame", "ratio_to_bound",
                "compile_seconds", "weight_bytes", "peak_activation_bytes", "bytes_moved_per_frame",
                "roofline_ms_per_frame", "roofline"):
        assert key in base, key
    assert base["compile_seconds"] == {}  # nothing compiled without --compile
    assert base["input"] == [8, 12] and base["output"] == [32, 48] and base["frames_out"] == 3
    assert base["threads"] == 1 and base["ms_per_frame"]["p10"] <= base["ms_per_frame"]["p90"]
    assert base["timed"] and base["launches_per_frame"] > 0 and base["count_s"] > 0
    groups = base["flops_per_frame"]
    assert {"denoiser", "controlnet", "decoder", "flow"} <= set(groups)
    assert sum(v for k, v in groups.items() if k != "total") == pytest.approx(groups["total"])
    assert result["vs"]["frames_in"] == 2
    assert result["speedup"] == pytest.approx(base["ms_per_output_frame"] / result["vs"]["ms_per_output_frame"])


def test_a_busy_machine_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    with pytest.raises(ValueError, match=r"load average is 64\.0"):
        bench.bench_pipeline(model="stream_diffvsr", height=32, width=48, frames=2)


def test_sizes_must_fit_the_scale() -> None:
    with pytest.raises(ValueError, match="must divide by 4"):
        bench.bench_pipeline(model="stream_diffvsr", height=30, width=48, frames=2, busy_ok=True)


def test_full_size_on_the_cpu_is_counted_not_timed(monkeypatch) -> None:
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # counting needs no idle machine
    result = bench.bench_pipeline(model="osdiffvsr", size="full", height=64, width=64, frames=2, device="cpu")
    assert not result["timed"] and "ms_per_frame" not in result
    assert result["frames_out"] == 2 and result["ratio_to_bound"] == pytest.approx(1, abs=0.01)
    assert {"vae encoder", "denoiser", "decoder", "flow"} <= set(result["flops_per_frame"])


def test_threads_are_set_reported_and_at_most_the_cores(toy, monkeypatch) -> None:
    monkeypatch.setattr(bench, "machine_cores", lambda: 2)
    with pytest.raises(ValueError, match=r"threads must be in \[1, 2\]"):
        bench.bench_pipeline(model="toy", height=8, width=8, frames=2, threads=3, busy_ok=True)
    before = torch.get_num_threads()
    try:
        result = bench.bench_pipeline(model="toy", height=8, width=8, frames=2, threads=2, busy_ok=True)
        assert result["threads"] == 2 == torch.get_num_threads() and result["cores"] == 2
    finally:
        torch.set_num_threads(before)


def test_count_only_reports_the_count_without_timing(toy, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    zoo_main(["bench", "--model", "toy", "--height", "8", "--width", "8", "--frames", "2", "--count-only",
              "--json", str(out), "--vs", "frames=3"])
    result = json.loads(out.read_text())
    base = result["baseline"]
    assert not base["timed"] and "ms_per_frame" not in base and result["speedup"] is None
    # Per frame: upsample, conv, relu, conv, add, clamp (see tests/bench/test_counting.py).
    assert base["launches_per_frame"] == 6 and result["launches_ratio"] == 1


def test_a_stored_count_is_reused_only_for_the_same_stream(toy, tmp_path, capsys, monkeypatch) -> None:
    stored = tmp_path / "count.json"
    zoo_main(["bench", "--model", "toy", "--height", "8", "--width", "8", "--frames", "2", "--count-only",
              "--dtype", "float32", "--json", str(stored)])
    count = json.loads(stored.read_text())

    def no_count(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr(bench, "_count", no_count)
    reused = bench.bench_pipeline(model="toy", height=8, width=8, frames=2, dtype="fp32", busy_ok=True,
                                  counts=count)  # "fp32" is "float32"
    assert reused["timed"] and reused["dtype"] == "fp32"
    assert all(reused[key] == count[key] for key in bench.COUNT_KEYS)
    # Over the whole timed stream, first frame included, as `flops_per_frame` is: the gaps after the first measure
    # nothing for a chunked pipeline, which yields a chunk at once.
    whole_ms = reused["first_frame_ms"] + reused["ms_per_frame"]["mean"] * (reused["frames_out"] - 1)
    assert reused["ms_per_output_frame"] == pytest.approx(whole_ms / reused["frames_out"])
    assert reused["tflops"] == pytest.approx(count["flops_per_frame"]["total"] / reused["ms_per_output_frame"] / 1e9)
    # A `--vs` record holds the count of its first run.
    assert bench.bench_pipeline(model="toy", height=8, width=8, frames=2, busy_ok=True, timed=False,
                                counts={"baseline": count})["launches_per_frame"] == count["launches_per_frame"]
    for changed, message in (({"frames": 3}, r"frames_in 2 \(not 3\)"), ({"height": 16}, r"output \[8, 8\]"),
                             ({"options": {"tile": 4}}, r"options \{\} \(not \{'tile': 4\}\)"),
                             ({"dtype": "bf16"}, r"dtype torch.float32 \(not torch.bfloat16\)")):
        settings = {"model": "toy", "height": 8, "width": 8, "frames": 2, "busy_ok": True, "counts": count,
                    **changed}
        with pytest.raises(ValueError, match="the stored count is of another run: " + message):
            bench.bench_pipeline(**settings)
    with pytest.raises(ValueError, match="lacks launches_per_frame"):
        bench.bench_pipeline(model="toy", height=8, width=8, frames=2, busy_ok=True,
                             counts={k: v for k, v in count.items() if k != "launches_per_frame"})


def test_a_stored_count_serves_runs_in_another_memory_format(monkeypatch) -> None:
    count = bench.bench_pipeline(model="stream_diffvsr", height=32, width=48, frames=2, timed=False)

    def no_count(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr(bench, "_count", no_count)
    # The count is the same in either layout (it runs on fake CPU tensors in PyTorch's default one).
    reused = bench.bench_pipeline(model="stream_diffvsr", height=32, width=48, frames=2, busy_ok=True,
                                  options={"channels_last": False}, counts=count)
    assert reused["timed"] and reused["options"] == {"channels_last": False}
    assert all(reused[key] == count[key] for key in bench.COUNT_KEYS)
    # And in a compiled one (the count is of the eager operators), as `--compile` runs are.
    compiled = {"compile": {"backend": "eager"}, "channels_last": True}
    assert bench._reuse_count(count, "stream_diffvsr", "tiny", 32, 48, 2, "float32", compiled) == {
        key: count[key] for key in bench.COUNT_KEYS}
    with pytest.raises(ValueError, match=r"options \{\} \(not \{'flow_resolution': 'lr'\}\)"):
        bench.bench_pipeline(model="stream_diffvsr", height=32, width=48, frames=2, busy_ok=True, counts=count,
                             options={"channels_last": False, "flow_resolution": "lr"})


def test_counts_flag_refuses_an_unreadable_file(toy, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["bench", "--model", "toy", "--height", "8", "--width", "8", "--frames", "2", "--counts", str(bad)])
    assert exit_info.value.code == 2
    assert f"--counts {bad} is not a readable JSON file" in capsys.readouterr().err


def test_group_timer_times_the_outermost_module_of_each_group(monkeypatch) -> None:
    inner = torch.nn.Linear(2, 2)
    first = torch.nn.Sequential(inner, torch.nn.ReLU())
    model = torch.nn.Sequential(first, torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Tanh()))
    groups = {first: "first", inner: "first", model[2]: "third", model[2][0]: "third"}
    clock = iter([1.000, 1.005, 2.000, 2.0125])  # the only clock reads: each group's outermost call and return
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    timer = bench.GroupTimer(groups, torch.device("cpu"))
    with timer:
        model(torch.rand(1, 2))
    model(torch.rand(1, 2))  # outside the context: no hooks left
    assert [group for group, _, _ in timer.intervals] == ["first", "third"]
    assert timer.totals_ms() == pytest.approx({"first": 5.0, "third": 12.5})


def test_breakdown_reports_milliseconds_by_group_for_eager_runs_only() -> None:
    result = bench.bench_pipeline(model="stream_diffvsr", height=32, width=48, frames=2, busy_ok=True,
                                  breakdown=True)
    by_group = result["ms_by_group"]
    assert {"denoiser", "controlnet", "flow", "decoder", "other"} <= set(by_group)
    assert all(ms > 0 for key, ms in by_group.items() if key != "other")
    with pytest.raises(ValueError, match="eager runs only"):
        bench.bench_pipeline(model="stream_diffvsr", height=32, width=48, frames=2, busy_ok=True,
                             breakdown=True, compile=True)
