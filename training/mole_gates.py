"""MoLE stage 3: train the gates only (soft assignment of the experts).

The base UNet and the experts stay frozen. Every layer the experts cover gets a MoLE layer
(mixture_core.mole.MoLELayer with trainable gates: a per-token local gate, a per-image global
gate) patched onto the module's forward (mixture_core.mole.wrap_forward) of this run's own copy
of the UNet; only the gates learn, from the plain noise-prediction loss on the full-body data.
The result is the pack's gate file (and, with --released-format, the released MoLE format),
which Apply MoLE Gating loads with the same experts.

    python -m training.mole_gates --checkpoint sd15.safetensors --data people/ \\
        --experts face=models/loras/mole_face.safetensors hand=models/loras/mole_hand.safetensors \\
        --output models/mole/mole_gates.safetensors --steps 50000 --lr 1e-5 --batch-size 8 --grad-accum 8
    accelerate launch -m training.mole_gates ...   (same arguments)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/mole_gates.py)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch

from training import accelerate_setup, base_model, checks, cli, datasets, grad_checkpoint, host, loop

GATE_PARAMS = ("local_weight", "local_bias", "global_weight", "global_bias")


def parse_args(argv=None):
    from mixture_core.mole import GATE_VARIANTS, MODES

    p = cli.base_parser(__doc__.split("\n\n")[0], epilog="Paper settings (MoLE): lr 1e-5, 50k steps, batch 64.")
    g = p.add_argument_group("gates")
    g.add_argument(
        "--experts",
        nargs="+",
        required=True,
        metavar="NAME=FILE",
        help="the frozen experts, named as the gate file will name them: face=face.safetensors hand=hand.safetensors",
    )
    g.add_argument(
        "--variant",
        choices=GATE_VARIANTS,
        default="released",
        help="global gate: 'released' (the public code: one head per expert on its pooled output) or 'paper' (Linear(d_in, n) on the pooled input)",
    )
    g.add_argument("--mode", choices=MODES, default="both", help="which gates are used while training (default both)")
    g.add_argument(
        "--init-gates",
        default=None,
        metavar="FILE",
        help="warm start: begin from the gates of an earlier gate file (the same experts in the same order, the same variant)",
    )
    g.add_argument(
        "--released-format",
        nargs="?",
        const="auto",
        default=None,
        metavar="FILE",
        help="also write the released MoLE format (two experts named face and hand, released variant); "
        "default file: <output>_released.safetensors",
    )
    args = p.parse_args(argv)
    cli.check_args(args)
    experts = []
    for item in args.experts:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise SystemExit(f"error: --experts takes NAME=FILE items (face=face.safetensors), not {item!r}")
        experts.append((name.strip(), path))
    names = [n for n, _ in experts]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: --experts: two experts share a name: {names}")
    if args.released_format:
        if sorted(names) != ["face", "hand"] or args.variant != "released":
            raise SystemExit(
                "error: --released-format holds exactly two experts named face and hand, with --variant released"
            )
        experts.sort(key=lambda e: ("face", "hand").index(e[0]))  # the released format's row order
        if args.released_format == "auto":
            args.released_format = str(Path(args.output).with_suffix("")) + "_released.safetensors"
    args.expert_files = experts
    return args


def load_experts(pairs) -> list:
    """Expert objects (mixture_core.mole_files.Expert) from LoRA files, UNet layers only
    (text-encoder layers are not gated), as Load MoLE Experts reads them."""
    from mixture_core.lora_format import parse_lora_state_dict
    from mixture_core.mole_files import Expert
    from mixture_core.safetensors_io import load_safetensors

    experts = []
    for name, path in pairs:
        tensors, _ = load_safetensors(path)
        layers = parse_lora_state_dict(tensors, path)
        unet_layers = {k: v for k, v in layers.items() if not k.startswith(("lora_te", "text_encoder", "te_"))}
        if not unet_layers:
            raise SystemExit(f"error: {path} holds only text-encoder LoRA layers; a MoLE expert needs UNet layers")
        experts.append(Expert(name=name, path=str(path), strength=1.0, layers=unet_layers))
    return experts


def initial_gates(widths: dict[str, tuple[int, int, bool]], n: int, variant: str, seed: int) -> dict:
    """Gates initialised as torch.nn.Linear is (uniform in +-1/sqrt(fan_in), weights and biases),
    which the released code uses for its gate layers. widths: {module path: (d_in, d_out, conv)}."""
    from mixture_core.mole import GateWeights

    g = torch.Generator().manual_seed(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    gates = {}
    for path, (d_in, d_out, _) in sorted(widths.items()):
        width = d_out if variant == "released" else d_in
        gates[path] = GateWeights(
            uniform((n, d_in), d_in), uniform((n,), d_in), uniform((n, width), width), uniform((n,), width)
        )
    return gates


class GatedUNet(torch.nn.Module):
    """The UNet with MoLE layers patched onto its modules' forwards, and those layers held as
    submodules so that Accelerate/DDP see (and synchronise) the gate parameters."""

    def __init__(self, unet: torch.nn.Module, layers: dict):
        super().__init__()
        self.unet = unet
        self.paths = list(layers)
        self.mole = torch.nn.ModuleList(layers.values())

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)

    def layers(self) -> dict:
        return dict(zip(self.paths, self.mole))


def read_init_gates(path, experts: list, variant: str):
    """The gate file a warm start begins from, checked against this run (before the base model
    loads): same experts in the same order (the gates' rows), same variant."""
    from mixture_core.mole_files import read_gate_file
    from mixture_core.safetensors_io import load_safetensors

    try:
        gate = read_gate_file(*load_safetensors(path), str(path))
    except Exception as e:  # the pack's WeightFileError and safetensors errors, named
        raise SystemExit(f"error: --init-gates {path}: {e}") from e
    names = [e.name for e in experts]
    if gate.expert_names != names:
        raise SystemExit(
            f"error: --init-gates {path}: gates for experts {gate.expert_names}, this run has {names} "
            "(give --experts with the same names, in the file's order)"
        )
    if gate.variant != variant:
        raise SystemExit(
            f"error: --init-gates {path}: a '{gate.variant}' gate file; this run trains --variant {variant}"
        )
    return gate


def build_gated_unet(base: base_model.Base, experts: list, variant: str, mode: str, seed: int, init=None) -> GatedUNet:
    """Check experts and gates against the model (mixture_core.mole_files.build_mole_layers, the
    assembly the Apply MoLE Gating node uses), make the gates trainable (as
    MoLELayer(trainable_gates=True)), and patch each layer onto its module's forward. The gates
    start random (initial_gates) or, given `init` (a GateFile), from its values."""
    from mixture_core.mole import wrap_forward
    from mixture_core.mole_files import GateFile, build_mole_layers, resolve_names

    helpers = host.node_helpers()
    resolve = helpers.layer_resolver(base.model_patcher)
    module_widths = helpers.module_widths(base.model_patcher)
    first = resolve_names(experts[0].layers, resolve, experts[0].path, "LoRA")
    widths = {first[name]: module_widths(first[name]) for name in experts[0].layers}
    gate = init or GateFile(
        None,
        variant,
        [e.name for e in experts],
        initial_gates(widths, len(experts), variant, seed),
        base.family,
        "module",
    )
    layers = build_mole_layers(
        experts, gate, resolve, mode=mode, strength=1.0, dtype=torch.float32, module_widths=module_widths
    )
    base_model.freeze(base.unet)
    for path, layer in layers.items():
        base_model.freeze(layer)
        for name in GATE_PARAMS:
            getattr(layer, name).requires_grad_(True)
        module = base.unet.get_submodule(path)
        module.forward = wrap_forward(layer, module.forward)
    return GatedUNet(base.unet, layers)


def gate_weights(model: GatedUNet) -> dict:
    from mixture_core.mole import GateWeights

    return {
        p: GateWeights(*(getattr(layer, n).detach().float().cpu().clone() for n in GATE_PARAMS))
        for p, layer in model.layers().items()
    }


def main(argv=None) -> loop.Result:
    args = parse_args(argv)
    accelerator = accelerate_setup.make_accelerator(args)
    samples = datasets.scan_data(args)
    checks.require_family(args.checkpoint, ("sd15", "sdxl"))
    for expert_name, path in args.expert_files:
        checks.lora_file(path, f"--experts {expert_name}=")
    from mixture_core.mole_files import read_gate_file, save_gate_file, save_released_gate_file
    from mixture_core.safetensors_io import load_safetensors

    with host.host_session():
        experts = load_experts(args.expert_files)  # read before the base model: a bad file stops the run at once
        init = read_init_gates(args.init_gates, experts, args.variant) if args.init_gates else None
        base = base_model.load_base(args.checkpoint)
        model = build_gated_unet(base, experts, args.variant, args.mode, args.seed, init)
        names = [e.name for e in experts]
        loop.log.info(
            "gates for experts %s on %d %s layers (%s variant, mode %s)",
            names,
            len(model.paths),
            base.family,
            args.variant,
            args.mode,
        )
        base_model.cast_frozen(model, cli.weight_dtype(args))
        if args.gradient_checkpointing:
            grad_checkpoint.enable_gradient_checkpointing(base.unet)
        trainable = {f"{p}.{n}": getattr(layer, n) for p, layer in model.layers().items() for n in GATE_PARAMS}
        kohya = base_model.kohya_names(base, model.paths) if args.released_format else None

        def write_output(path, step):
            gates = gate_weights(model)
            extra = {
                "mole.stage": "gates",
                "mole.trained_steps": str(step),
                "mole.expert_files": json.dumps({e.name: Path(e.path).name for e in experts}),
                "mole.training_mode": args.mode,
            }
            save_gate_file(path, gates, names, args.variant, base.family, extra)
            read_gate_file(*load_safetensors(path), path)  # reads back as the node will
            if args.released_format:
                released = (
                    args.released_format
                    if path == args.output
                    else str(Path(path).with_suffix("")) + "_released.safetensors"
                )
                save_released_gate_file(released, gates, kohya)
                read_gate_file(*load_safetensors(released), released)

        stage = loop.Stage("gates", model, trainable, write_output)
        result = loop.train(args, accelerator, base, stage, samples)
    accelerate_setup.end_accelerator(accelerator)
    return result


if __name__ == "__main__":
    main()
