from __future__ import annotations

import math
from urllib.error import URLError

import pytest
import torch
from torchvision.models.optical_flow._utils import make_coords_grid

from zoo.bench.pipeline import DispatchCounter
from zoo.components.flow import (
    FlowEstimator,
    FlowFeatures,
    GroundTruthFlow,
    consecutive_flows,
    occlusion_mask,
    published_raft_weights,
    resize_flow,
    valid_mask,
    warp,
    warp_error_map,
)


def constant_flow(dx: float, dy: float, height: int, width: int, n: int = 1) -> torch.Tensor:
    flow = torch.empty(n, 2, height, width)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def pan_clip(k: int, height: int = 12, width: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two frames whose content moves right by k pixels, k new columns revealed on the left."""
    torch.manual_seed(0)
    scene = torch.rand(3, height, width + k)
    frame0, frame1 = scene[:, :, k:], scene[:, :, :width]
    # Pixel x of frame0 shows scene column x + k, found at column x + k of frame1.
    return torch.stack([frame0, frame1]), constant_flow(k, 0, height, width), constant_flow(-k, 0, height, width)


# warp ------------------------------------------------------------------------------------


def test_warp_integer_shift_moves_pixels_exactly() -> None:
    image = torch.arange(8.0).reshape(1, 1, 2, 4)
    out = warp(image, constant_flow(1, 0, 2, 4))
    # Samples column x + 1; the last column reads past the edge and repeats the border pixel.
    assert torch.allclose(out, torch.tensor([[[[1.0, 2, 3, 3], [5, 6, 7, 7]]]]), atol=1e-6)
    out = warp(image, constant_flow(0, -1, 2, 4))
    assert torch.allclose(out, torch.tensor([[[[0.0, 1, 2, 3], [0, 1, 2, 3]]]]), atol=1e-6)


def test_warp_half_pixel_shift_averages_neighbours() -> None:
    image = torch.tensor([[[[0.0, 2.0, 6.0, 10.0]]]])
    out = warp(image, constant_flow(0.5, 0, 1, 4))
    assert torch.allclose(out, torch.tensor([[[[1.0, 4.0, 8.0, 10.0]]]]), atol=1e-6)


def test_warp_keeps_half_precision_images_and_samples_in_float32() -> None:
    image = torch.rand(1, 3, 4, 600).to(torch.bfloat16)
    out = warp(image, constant_flow(1, 0, 4, 600))
    assert out.dtype == torch.bfloat16
    # bf16 coordinates near x = 599 would be off by whole pixels; float32 ones move it exactly by 1.
    assert (out[..., :-1].float() - image[..., 1:].float()).abs().max() < 1e-2


def test_warp_zeros_padding_fades_outside_the_frame() -> None:
    image = torch.tensor([[[[4.0, 8.0]]]])
    assert torch.allclose(warp(image, constant_flow(1, 0, 1, 2), "zeros"), torch.tensor([[[[8.0, 0.0]]]]), atol=1e-6)
    # Position 1.5 is half way between the last pixel centre and the zero outside.
    assert torch.allclose(warp(image, constant_flow(0.5, 0, 1, 2), "zeros"), torch.tensor([[[[6.0, 4.0]]]]), atol=1e-6)


def test_warp_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="matching flow"):
        warp(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="padding_mode"):
        warp(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4), "reflection")


def test_warp_of_pan_reproduces_the_previous_frame_where_visible() -> None:
    frames, flow_fw, flow_bw = pan_clip(k=3)
    warped = warp(frames[1:], flow_fw)
    visible = valid_mask(flow_fw, flow_bw).bool().expand_as(warped)
    assert torch.allclose(warped[visible], frames[:1][visible], atol=1e-5)
    # Going the other way, frame1's revealed columns are the ones without a match in frame0.
    warped_back = warp(frames[:1], flow_bw)
    visible_back = valid_mask(flow_bw, flow_fw).bool().expand_as(warped_back)
    assert torch.allclose(warped_back[visible_back], frames[1:][visible_back], atol=1e-5)


# occlusion -------------------------------------------------------------------------------


def test_occlusion_mask_flags_exactly_the_columns_a_pan_reveals_or_hides() -> None:
    k, width = 3, 20
    _, flow_fw, flow_bw = pan_clip(k=k, width=width)
    hidden = occlusion_mask(flow_fw, flow_bw)  # pixels of frame0 that leave frame1
    revealed = occlusion_mask(flow_bw, flow_fw)  # pixels of frame1 new in it
    assert hidden.shape == (1, 1, 12, width)
    expected_hidden = torch.zeros(width)
    expected_hidden[width - k :] = 1
    assert torch.equal(hidden[0, 0], expected_hidden.expand(12, width))
    assert torch.equal(revealed[0, 0], expected_hidden.flip(0).expand(12, width))
    assert torch.equal(valid_mask(flow_fw, flow_bw), 1 - hidden)


def test_occlusion_mask_consistency_threshold_by_hand() -> None:
    flow_fw = torch.zeros(1, 2, 4, 6)
    flow_bw = torch.zeros(1, 2, 4, 6)
    # Inside the frame the round trip is f_fw + f_bw(p): 2 px gives 4 > 0.01 * 4 + 0.5,
    # 0.5 px gives 0.25 < 0.01 * 0.25 + 0.5.
    flow_bw[0, 0, :, :3] = 2.0
    flow_bw[0, 0, :, 3:] = 0.5
    mask = occlusion_mask(flow_fw, flow_bw)
    assert torch.equal(mask[0, 0, :, :3], torch.ones(4, 3))
    assert torch.equal(mask[0, 0, :, 3:], torch.zeros(4, 3))


def test_occlusion_mask_tolerance_grows_with_flow_magnitude() -> None:
    # f_fw = 10 px down, f_bw = -9 px: mismatch 1 against 0.01 * (100 + 81) + 0.5 = 2.31.
    flow_fw = constant_flow(0, 10, 40, 3)
    flow_bw = constant_flow(0, -9, 40, 3)
    inside = slice(0, 30)  # rows whose target row y + 10 stays in the frame
    assert torch.equal(occlusion_mask(flow_fw, flow_bw)[0, 0, inside], torch.zeros(30, 3))
    assert torch.equal(occlusion_mask(flow_fw, flow_bw, alpha1=0.0)[0, 0, inside], torch.ones(30, 3))
    assert torch.equal(occlusion_mask(flow_fw, flow_bw)[0, 0, 30:], torch.ones(10, 3))


# resize / error map ------------------------------------------------------------------------


def test_resize_flow_rescales_each_axis_by_its_size_ratio() -> None:
    out = resize_flow(constant_flow(1.0, 2.0, 4, 6), (8, 3))
    assert out.shape == (1, 2, 8, 3)
    assert torch.allclose(out[:, 0], torch.full((1, 8, 3), 0.5))
    assert torch.allclose(out[:, 1], torch.full((1, 8, 3), 4.0))


def test_resize_flow_keeps_warps_consistent_across_resolutions() -> None:
    # A 1 px pan at 8 px wide is a 2 px pan at 16 px wide.
    flow = resize_flow(constant_flow(1.0, 0.0, 8, 8), (16, 16), mode="nearest")
    assert torch.equal(flow[:, 0], torch.full((1, 16, 16), 2.0))


def test_warp_error_map_by_hand() -> None:
    image = torch.zeros(1, 3, 2, 2)
    warped = torch.tensor([0.3, 0.6, 0.9]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = warp_error_map(image, warped, alpha=2.0)
    assert out.shape == (1, 1, 2, 2)
    assert torch.allclose(out, torch.full((1, 1, 2, 2), math.exp(-1.2)))
    assert torch.equal(warp_error_map(image, image, alpha=5.0), torch.ones(1, 1, 2, 2))


# flow sources ------------------------------------------------------------------------------


def test_ground_truth_flow_looks_up_pairs_in_both_directions() -> None:
    torch.manual_seed(0)
    frames = torch.rand(4, 3, 5, 6)
    fw, bw = torch.randn(3, 2, 5, 6), torch.randn(3, 2, 5, 6)
    flow_fn = GroundTruthFlow(frames, fw, bw)
    assert torch.equal(flow_fn(frames[[0, 2]], frames[[1, 3]]), fw[[0, 2]])
    assert torch.equal(flow_fn(frames[[2]], frames[[1]]), bw[[1]])
    assert torch.equal(consecutive_flows(flow_fn, frames, batch_size=2), fw)
    assert torch.equal(consecutive_flows(flow_fn, frames, backward=True), bw)
    with pytest.raises(ValueError, match="not consecutive"):
        flow_fn(frames[[0]], frames[[2]])
    with pytest.raises(ValueError, match="not consecutive"):
        GroundTruthFlow(frames, fw)(frames[[1]], frames[[0]])


def inside_frame(flow: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) mask of pixels whose target p + flow(p) lies within the pixel centres."""
    height, width = flow.shape[-2:]
    x = torch.arange(width) + flow[:, 0]
    y = torch.arange(height)[:, None] + flow[:, 1]
    return ((x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1))[:, None].float()


def test_sample_clips_warp_to_previous_frame_inside_the_frame() -> None:
    from zoo.components.samples import sample_clips

    for clip in sample_clips(num_frames=3, size=(48, 64)):
        frames, flow = clip.frames, clip.flow
        assert flow.shape == (2, 2, 48, 64)
        inside = inside_frame(flow)
        warped_error = ((warp(frames[1:], flow) - frames[:-1]).abs() * inside).sum() / (inside.sum() * 3)
        unwarped_error = ((frames[1:] - frames[:-1]).abs() * inside).sum() / (inside.sum() * 3)
        assert inside.mean() > 0.5, clip.name
        assert warped_error < 0.02, clip.name
        assert warped_error < 0.25 * unwarped_error, clip.name


def test_occlusion_mask_flags_the_borders_of_the_sample_pan() -> None:
    from zoo.components.samples import sample_clips

    (clip,) = sample_clips(num_frames=3, size=(48, 64), names=["astronaut_pan"])
    flow_fw = clip.flow
    # The pan is a pure translation of 12.8 px to the left per frame; its backward flow is -flow.
    assert torch.allclose(flow_fw[:, 0], torch.full((2, 48, 64), -12.8)) and flow_fw[:, 1].abs().max() == 0
    hidden = occlusion_mask(flow_fw, -flow_fw)[:, 0]  # columns x + dx < 0 leave the next frame
    revealed = occlusion_mask(-flow_fw, flow_fw)[:, 0]  # columns x - dx > 63 are new in the next frame
    expected = torch.zeros(64)
    expected[:13] = 1
    assert torch.equal(hidden, expected.expand(2, 48, 64))
    assert torch.equal(revealed, expected.flip(0).expand(2, 48, 64))
    visible = (1 - hidden[:, None]).bool().expand(2, 3, 48, 64)
    warped = warp(clip.frames[1:], flow_fw)
    assert (warped - clip.frames[:-1])[visible].abs().mean() < 0.02
    assert (warped - clip.frames[:-1])[~visible].abs().mean() > 0.05


# RAFT ------------------------------------------------------------------------------------


def test_flow_estimator_returns_flow_of_the_input_size_for_odd_sizes() -> None:
    torch.manual_seed(0)
    estimator = FlowEstimator("small", pretrained=False, num_flow_updates=2)
    src, dst = torch.rand(2, 3, 75, 133), torch.rand(2, 3, 75, 133)
    flow = estimator(src, dst)
    assert flow.shape == (2, 2, 75, 133)
    assert flow.dtype == torch.float32
    assert torch.isfinite(flow).all()
    assert not flow.requires_grad
    assert all(not p.requires_grad for p in estimator.parameters())
    assert estimator.min_size == 128


def test_flow_estimator_stays_in_eval_mode_and_runs_under_autocast() -> None:
    estimator = FlowEstimator("small", pretrained=False, num_flow_updates=1, autocast_dtype=torch.bfloat16)
    estimator.train()
    assert not estimator.raft.training
    flow = estimator(torch.rand(1, 3, 20, 30), torch.rand(1, 3, 20, 30))
    assert flow.shape == (1, 2, 20, 30) and flow.dtype == torch.float32


def test_flow_estimator_pretrained_offline_names_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as api

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("offline")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match=r"checkpoints/raft_small_C_T_V2-01064c6d\.pth .*download https://"):
        FlowEstimator("small", pretrained=True)
    url, path = published_raft_weights("small")
    assert (path.name, path.parent.name) == ("raft_small_C_T_V2-01064c6d.pth", "checkpoints")
    assert url.endswith("/raft_small_C_T_V2-01064c6d.pth")


def test_flow_estimator_signed_inputs_skip_the_rescaling() -> None:
    torch.manual_seed(0)
    unit = FlowEstimator("small", pretrained=False, num_flow_updates=1)
    signed = FlowEstimator("small", pretrained=False, num_flow_updates=1, signed_inputs=True)
    signed.load_state_dict(unit.state_dict())
    src, dst = torch.rand(1, 3, 24, 32), torch.rand(1, 3, 24, 32)
    # [0, 1] inputs are mapped by x -> 2x - 1 inside; signed inputs go to RAFT as they are.
    assert torch.equal(signed(src * 2 - 1, dst * 2 - 1), unit(src, dst))
    assert not torch.allclose(signed(src, dst), unit(src, dst))


def test_flow_estimator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="variant"):
        FlowEstimator("medium", pretrained=False)
    with pytest.raises(ValueError, match="src and dst"):
        FlowEstimator("small", pretrained=False)(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def test_raft_stays_float32_when_its_model_is_cast_to_bfloat16() -> None:
    holder = torch.nn.ModuleDict({"flow": FlowEstimator("small", pretrained=False, num_flow_updates=1),
                                  "head": torch.nn.Linear(2, 2)}).to(torch.bfloat16)
    assert holder["head"].weight.dtype == torch.bfloat16
    assert {p.dtype for p in holder["flow"].parameters()} == {torch.float32}
    image = torch.rand(1, 3, 16, 16)
    assert holder["flow"](image.bfloat16(), image.bfloat16()).dtype == torch.float32
    assert {p.dtype for p in holder.double()["flow"].parameters()} == {torch.float64}  # only half casts are kept


@pytest.mark.parametrize("variant", ["large", "small"])
def test_final_flow_is_torchvision_rafts_last_prediction(variant: str) -> None:
    torch.manual_seed(0)
    estimator = FlowEstimator(variant, pretrained=False, num_flow_updates=5)
    image1, image2 = torch.rand(2, 2, 3, 128, 160) * 2 - 1
    with torch.no_grad():
        predictions = estimator.raft(image1, image2, num_flow_updates=5)
        ours = estimator.final_flow(image1, image2)
    # Measured: 2e-6 px (large) and 3e-5 px (small, 12 updates) from torchvision: the GRU's rounding only.
    torch.testing.assert_close(ours, predictions[-1], atol=1e-4, rtol=0)
    assert (ours - predictions[-2]).abs().max() > 1e-2  # the update count reaches the loop


@pytest.mark.parametrize("variant", ["large", "small"])
def test_update_is_torchvisions_update_block_in_fewer_launches(variant: str) -> None:
    torch.manual_seed(0)
    estimator = FlowEstimator(variant, pretrained=False)
    block = estimator.raft.update_block
    hidden_size = block.hidden_state_size
    context_size = block.recurrent_block.convgru1.convz.in_channels - hidden_size - block.motion_encoder.out_channels
    corr = torch.randn(2, estimator.raft.corr_block.out_channels, 6, 7)
    hidden, context = torch.randn(2, hidden_size, 6, 7), torch.randn(2, context_size, 6, 7)
    flow = torch.randn(2, 2, 6, 7)
    gates = estimator._merged_gates()
    with torch.no_grad():
        expected = block(hidden, context, corr, flow)
        with DispatchCounter() as theirs:
            block(hidden, context, corr, flow)
        with DispatchCounter() as ours:
            got = estimator.update(hidden, context, corr, flow, gates)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (ours.launches, theirs.launches) == ((29, 42) if variant == "large" else (20, 27))
    # The gates carry the reset gate into the candidate: a wrong split (z for r) changes the state.
    gates = [(torch.cat([w.chunk(2)[1], w.chunk(2)[0]]), torch.cat([b.chunk(2)[1], b.chunk(2)[0]]))
             for w, b in gates]
    with torch.no_grad():
        swapped = estimator.update(hidden, context, corr, flow, gates)
    assert (swapped[0] - expected[0]).abs().max() > 1e-3


def test_merged_gates_follow_the_weights() -> None:
    estimator = FlowEstimator("small", pretrained=False)
    ((weight, _),) = estimator._merged_gates()
    gru = estimator.raft.update_block.recurrent_block.convgru1
    assert torch.equal(weight, torch.cat([gru.convz.weight, gru.convr.weight]))
    assert estimator._merged_gates()[0][0] is weight  # made once
    with torch.no_grad():
        gru.convr.bias.add_(1.0)  # a write in place, as loading a checkpoint does
    assert torch.equal(estimator._merged_gates()[0][1], torch.cat([gru.convz.bias, gru.convr.bias]))
    assert estimator.double()._merged_gates()[0][0].dtype == torch.float64
    replaced = {name: torch.randn_like(value) for name, value in gru.state_dict().items()}
    gru.load_state_dict(replaced, assign=True)  # new parameter objects, version 0 again
    assert torch.equal(estimator._merged_gates()[0][0], torch.cat([replaced["convz.weight"], replaced["convr.weight"]]))


def test_final_flow_predicts_the_upsampling_mask_once() -> None:
    estimator = FlowEstimator("large", pretrained=False, num_flow_updates=4)
    calls = []
    estimator.raft.update_block.flow_head.register_forward_hook(lambda *args: calls.append("update"))
    estimator.raft.mask_predictor.register_forward_hook(lambda *args: calls.append("mask"))
    estimator(*torch.rand(2, 1, 3, 128, 128))
    assert calls == ["update"] * 4 + ["mask"]  # torchvision's forward: ["update", "mask"] * 4


def test_correlation_features_are_torchvisions_lookup_to_the_bit_in_9_launches() -> None:
    torch.manual_seed(0)
    estimator = FlowEstimator("small", pretrained=False)
    block = estimator.raft.corr_block
    fmap1, fmap2 = torch.randn(2, 2, 32, 16, 24)
    block.build_pyramid(fmap1, fmap2)
    # Centroids off the grid, some outside the image: every level interpolates and pads.
    coords = make_coords_grid(2, 16, 24) + torch.randn(2, 2, 16, 24) * 9
    coords0, lookup = estimator._lookup_constants(fmap1, block.corr_pyramid)
    assert torch.equal(coords0, make_coords_grid(2, 16, 24))
    counter = DispatchCounter()
    with counter:
        ours = estimator.correlation_features(block.corr_pyramid, coords, *lookup)
    assert torch.equal(ours, block.index_pyramid(coords))
    assert counter.launches == 9  # torchvision's index_pyramid: 45
    with DispatchCounter() as again:
        assert estimator._lookup_constants(fmap1, block.corr_pyramid)[1] is lookup  # made once per size
    assert again.launches == 0


def test_raft_runs_on_the_meta_device() -> None:
    # Full-size networks are built and counted on `meta`; the flow needs no real tensor to get its shape.
    estimator = FlowEstimator("large", pretrained=False).to("meta")
    flow = estimator(torch.empty(2, 3, 180, 320, device="meta"), torch.empty(2, 3, 180, 320, device="meta"))
    assert flow.shape == (2, 2, 180, 320) and flow.device.type == "meta"


@pytest.mark.parametrize("variant", ["large", "small"])
def test_flows_from_encodings_made_once_are_the_flows_of_the_images(variant: str) -> None:
    torch.manual_seed(0)
    estimator = FlowEstimator(variant, pretrained=False, num_flow_updates=4)
    before, current, after = torch.rand(3, 1, 3, 60, 100)  # padded to 128x128 inside, cropped back
    expected = estimator(torch.cat([current, current]), torch.cat([before, after]))
    encoded = {name: estimator.features(image) for name, image in
               (("before", before), ("current", current), ("after", after))}
    assert encoded["current"].fmap.shape[-2:] == (16, 16) and encoded["current"].size == (60, 100)
    got = estimator(FlowFeatures.cat([encoded["current"]] * 2),
                                 FlowFeatures.cat([encoded["before"], encoded["after"]]))
    # Measured: equal (RAFT-large), 1.5e-5 px (RAFT-small, whose convolutions round a batch of 1 differently).
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The source's encodings lead: the reverse pair gives another flow.
    reverse = estimator(FlowFeatures.cat([encoded["before"], encoded["after"]]),
                                     FlowFeatures.cat([encoded["current"]] * 2))
    assert (reverse - expected).abs().max() > 1e-2


def test_destination_only_features_skip_the_context_encoder() -> None:
    torch.manual_seed(0)
    estimator = FlowEstimator("small", pretrained=False, num_flow_updates=2)
    calls = []
    estimator.raft.context_encoder.register_forward_hook(lambda *args: calls.append(1))
    current, previous = torch.rand(2, 1, 3, 32, 48)
    destination = estimator.features(previous, source=False)
    assert not calls and destination.hidden is None and destination.context is None and not destination.is_source
    full = estimator.features(previous)
    assert len(calls) == 1 and full.is_source and torch.equal(destination.fmap, full.fmap)
    # As a destination it is the full encodings: the flow to it is the same, to the bit.
    source = estimator.features(current)
    assert torch.equal(estimator(source, destination), estimator(source, full))
    kept = full.destination()  # what a stream keeps of a frame for the next flow
    assert kept.fmap is full.fmap and not kept.is_source and kept.size == full.size
    with pytest.raises(ValueError, match="source=False: a flow's source needs its context"):
        estimator(destination, source)
    with pytest.raises(ValueError, match="all with or all without context"):
        FlowFeatures.cat([destination, full])
    both = FlowFeatures.cat([destination, destination])
    assert both.fmap.shape[0] == 2 and both.hidden is None


def test_flow_features_of_other_sizes_are_refused() -> None:
    estimator = FlowEstimator("small", pretrained=False, num_flow_updates=1)
    small, large = estimator.features(torch.rand(1, 3, 16, 16)), estimator.features(torch.rand(1, 3, 24, 16))
    with pytest.raises(ValueError, match="features to join must be of one image size"):
        FlowFeatures.cat([small, large])
    with pytest.raises(ValueError, match="src and dst features must be of one batch and image size"):
        estimator(small, large)
    with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\)"):
        estimator.features(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="must both be images or both FlowFeatures"):
        estimator(small, torch.rand(1, 3, 16, 16))
