"""mixture_core.recording: what the gate/router recordings keep, and the drawing helpers."""

from __future__ import annotations

import pytest
import torch

from mixture_core.recording import GateRecording, RouterRecording, colorize, overlay, pick_steps, token_grid


def test_token_grid_finds_the_unet_level_of_non_square_latents():
    assert token_grid(6 * 8, 6, 8) == (6, 8)
    assert token_grid(3 * 4, 6, 8) == (3, 4)
    assert token_grid(2 * 2, 6, 8) == (2, 2)  # ceil(3/2) x ceil(4/2)
    assert token_grid(1, 6, 8) == (1, 1)
    assert token_grid(77, 6, 8) is None  # text tokens (cross-attention's to_k/to_v) are not pixels


def test_gate_recording_keeps_cond_rows_and_averages_layers_per_step():
    rec = GateRecording(["face", "hand"])
    cond = torch.tensor([True, False])  # row 0 cond, row 1 uncond (cfg > 1)
    for sigma in (14.6, 14.6, 7.0):  # the second call at 14.6 is the same step (cfg batched apart)
        rec.begin_call(sigma, cond, (4, 6))
        for layer, value in (("a", 0.2), ("b", 0.4)):
            local = torch.full((2, 24, 2), value)
            local[1] = 0.99  # the uncond row must not leak in
            rec.observe(layer, local, torch.full((2, 1, 2), value))
        rec.observe("text", torch.full((2, 77, 2), 0.9), None)  # text-token layer: no map
    assert rec.sigmas == [14.6, 7.0] and rec.layers_seen == {"a", "b", "text"}
    gates = rec.global_gates()
    assert gates.shape == (2, 1, 2)
    torch.testing.assert_close(gates, torch.full((2, 1, 2), 0.3))
    maps = rec.local_maps(0)
    assert maps.shape == (1, 2, 4, 6)
    torch.testing.assert_close(maps, torch.full((1, 2, 4, 6), 0.3))
    assert rec.local_maps(5) is None
    rec.reset()
    assert rec.sigmas == [] and rec.local_maps(0) is None and rec.expert_names == ["face", "hand"]


def test_local_maps_keep_where_the_gate_fires():
    rec = GateRecording(["face"])
    rec.begin_call(1.0, torch.tensor([True]), (4, 4))
    local = torch.zeros(1, 16, 1)
    local[0, 0] = 1.0  # top-left pixel only
    rec.observe("a", local, None)
    maps = rec.local_maps(0)[0, 0]
    assert maps.argmax() == 0 and maps[3, 3] == 0
    assert rec.global_gates().numel() == 0  # mode "local": no global gate recorded


def test_router_recording_maps_per_step_and_layer():
    rec = RouterRecording()
    rec.begin_call(5.0, torch.tensor([True, False]), (6, 8))
    rec.observe(3, "input_blocks.1.1.transformer_blocks.0.attn1", torch.rand(2, 48))
    rec.observe(7, "middle_block.1.transformer_blocks.0.attn2", torch.rand(2, 2 * 2))
    assert rec.layers() == [3, 7]
    assert rec.maps[(0, 3)].shape == (1, 6, 8) and rec.maps[(0, 7)].shape == (1, 2, 2)


def test_pick_steps():
    assert pick_steps("first, middle, last", 10) == [0, 5, 9]
    assert pick_steps("0, -1, 3", 10) == [0, 9, 3]
    for bad in ("12", "x", ""):
        with pytest.raises(ValueError):
            pick_steps(bad, 10)


def test_colorize_and_overlay():
    ramp = colorize(torch.tensor([[0.0, 0.5, 1.0]]))
    assert ramp.shape == (1, 3, 3)
    assert ramp[0, 0].sum() < ramp[0, 1].sum() < ramp[0, 2].sum()  # dark to bright
    image = torch.full((8, 12, 3), 0.5)
    out = overlay(image, torch.ones(2, 3), opacity=1.0)
    assert out.shape == (8, 12, 3)
    torch.testing.assert_close(out, colorize(torch.ones(8, 12)))
    torch.testing.assert_close(overlay(image, torch.ones(2, 3), opacity=0.0), image)
