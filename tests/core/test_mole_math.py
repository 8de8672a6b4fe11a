"""The fused MoLE layer against a plain reference written from the equations."""

import pytest
import torch

from mixture_core.lora_format import LoRAPair
from mixture_core.mole import GateWeights, MoLELayer, wrap_forward


def make_experts(n, d_in, d_out, ranks=None, conv=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [4 + 2 * i for i in range(n)]
    return [
        LoRAPair(
            down=torch.randn(r, d_in, generator=g, dtype=dtype) * 0.3,
            up=torch.randn(d_out, r, generator=g, dtype=dtype) * 0.3,
            alpha=float(r) / (i + 1),  # distinct trained scales alpha/rank per expert
            is_conv=conv,
        )
        for i, r in enumerate(ranks)
    ]


def make_gates(n, d_in, d_out, variant, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    width = d_out if variant == "released" else d_in
    return GateWeights(
        torch.randn(n, d_in, generator=g, dtype=dtype),
        torch.randn(n, generator=g, dtype=dtype),
        torch.randn(n, width, generator=g, dtype=dtype) * 0.5,
        torch.randn(n, generator=g, dtype=dtype),
    )


def reference(x_tokens, experts, gates, variant, mode, strengths, strength):
    """F(X) + strength * sum_i w_i * s_i * g_i * E_i(X), one expert at a time, from the equations."""
    out = torch.zeros(*x_tokens.shape[:-1], experts[0].d_out, dtype=x_tokens.dtype)
    for i, e in enumerate(experts):
        expert_out = x_tokens @ e.down.t() @ e.up.t()  # E_i(X), (B, T, d_out)
        local = torch.sigmoid(x_tokens @ gates.local_weight[i] + gates.local_bias[i])[..., None]  # (B, T, 1)
        if variant == "released":
            pooled = (e.scale * expert_out).mean(dim=1)  # token-mean of the scaled expert output
            glob = torch.sigmoid(pooled @ gates.global_weight[i] + gates.global_bias[i])[:, None, None]
        else:
            glob = torch.sigmoid(x_tokens.mean(dim=1) @ gates.global_weight[i] + gates.global_bias[i])[:, None, None]
        g = {"both": local * glob, "local": local, "global": glob}[mode]
        out = out + strength * strengths[i] * e.scale * g * expert_out
    return out


@pytest.mark.parametrize("variant", ["released", "paper"])
@pytest.mark.parametrize("mode", ["both", "local", "global"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_linear_layer_matches_reference(variant, mode, n):
    d_in, d_out = 12, 10
    experts = make_experts(n, d_in, d_out)
    gates = make_gates(n, d_in, d_out, variant)
    strengths = [1.0, 0.5, 1.5][:n]
    layer = MoLELayer(experts, gates, variant, mode, expert_strengths=strengths, strength=0.8)
    x = torch.randn(3, 7, d_in, dtype=torch.float64)
    base = torch.randn(3, 7, d_out, dtype=torch.float64)
    got = layer(x, base)
    want = base + reference(x, experts, gates, variant, mode, strengths, 0.8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_conv_layer_non_square_matches_reference(variant):
    """1x1 conv layers (SD1.5 proj_in/proj_out) at a non-square size: tokens are H*W pixels."""
    d_in, d_out, h, w = 8, 6, 5, 9
    experts = make_experts(2, d_in, d_out, conv=True)
    gates = make_gates(2, d_in, d_out, variant)
    layer = MoLELayer(experts, gates, variant, "both")
    x = torch.randn(2, d_in, h, w, dtype=torch.float64)
    base = torch.randn(2, d_out, h, w, dtype=torch.float64)
    got = layer(x, base)
    tokens = x.flatten(2).transpose(1, 2)
    ref = reference(tokens, experts, gates, variant, "both", [1.0, 1.0], 1.0)
    want = base + ref.transpose(1, 2).reshape(2, d_out, h, w)
    assert got.shape == (2, d_out, h, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_strength_zero_is_bit_identical_and_nonzero_changes_output():
    experts = make_experts(2, 8, 8)
    gates = make_gates(2, 8, 8, "released")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    base = torch.randn(2, 5, 8, dtype=torch.float64)
    assert MoLELayer(experts, gates, strength=0.0)(x, base) is base
    assert MoLELayer(experts, gates, expert_strengths=[0.0, 0.0])(x, base) is base
    changed = MoLELayer(experts, gates)(x, base)
    assert not torch.equal(changed, base)


def test_one_expert_at_zero_strength_removes_only_its_contribution():
    experts = make_experts(2, 8, 8)
    gates = make_gates(2, 8, 8, "paper")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    zero = torch.zeros(2, 5, 8, dtype=torch.float64)
    only_second = MoLELayer(experts, gates, "paper", expert_strengths=[0.0, 1.0])(x, zero)
    second_alone = MoLELayer(experts[1:], GateWeights(*(t[1:] for t in vars(gates).values())), "paper")(x, zero)
    torch.testing.assert_close(only_second, second_alone)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_keep_their_dtype(dtype):
    experts, gates = make_experts(2, 16, 16), make_gates(2, 16, 16, "released")
    x = torch.randn(2, 9, 16).to(dtype)
    out = MoLELayer(experts, gates)(x, torch.zeros(2, 9, 16, dtype=dtype))  # float64 weights, cast per call
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    want = MoLELayer(experts, gates)(x.double(), torch.zeros(2, 9, 16, dtype=torch.float64))
    torch.testing.assert_close(out.double(), want, rtol=5e-2, atol=5e-2)


def test_wrap_forward_chains_the_previous_forward():
    linear = torch.nn.Linear(6, 4).double()
    layer = MoLELayer(make_experts(2, 6, 4), make_gates(2, 6, 4, "released"))
    calls = []

    def previous(x):  # stands for another pack's patch already in the chain
        calls.append(x.shape)
        return linear(x) * 2

    fwd = wrap_forward(layer, previous)
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(fwd(x), linear(x) * 2 + layer.delta(x))
    assert calls == [(1, 3, 6)]
    # the same forward with an observer: the same output, and the gates of the call reported
    seen = []
    observed = fwd.with_observer(lambda local, global_: seen.append((local, global_)))
    assert observed.layer is layer and observed.base_forward is previous and fwd.observer is None
    torch.testing.assert_close(observed(x), fwd(x))
    assert len(seen) == 1 and seen[0][0].shape == (1, 3, 2) and seen[0][1].shape == (1, 1, 2)


def test_batch_entries_are_independent():
    """The global gate is per sample: a sample's output must not depend on its batch neighbours."""
    layer = MoLELayer(make_experts(2, 8, 8), make_gates(2, 8, 8, "released"))
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    full = layer.delta(x)
    torch.testing.assert_close(full[1:2], layer.delta(x[1:2]))


def test_mismatched_gate_shape_is_refused():
    experts = make_experts(2, 8, 8)
    with pytest.raises(ValueError, match="global_weight has shape"):
        MoLELayer(
            experts, GateWeights(torch.zeros(2, 8), torch.zeros(2), torch.zeros(2, 5), torch.zeros(2)), "released"
        )
    with pytest.raises(ValueError, match="local_weight has shape"):
        MoLELayer(experts, make_gates(3, 8, 8, "released"))


def test_gate_gradients_flow_and_experts_stay_frozen():
    layer = MoLELayer(make_experts(2, 8, 8), make_gates(2, 8, 8, "released"), trainable_gates=True)
    loss = layer.delta(torch.randn(2, 5, 8, dtype=torch.float64)).square().mean()
    loss.backward()
    assert layer.local_weight.grad is not None and layer.global_weight.grad is not None
    assert layer.global_weight.grad.abs().sum() > 0
    assert not layer.down.requires_grad and not layer.up.requires_grad
