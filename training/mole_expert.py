"""MoLE stage 2: train one close-up low-rank expert (face, hand or any other part).

A UNet-only LoRA, injected with peft into the ComfyUI UNet on the layers MoLE gates
(mixture_core.unet_names.is_mole_target: in every spatial transformer proj_in/proj_out, the q/k/v/out
projections of both attentions and the two feed-forward projections; 192 layers on SD1.5),
trained with the plain noise-prediction loss on close-up images of the part. The result is a
kohya-format LoRA that ComfyUI's LoraLoader and the pack's Load MoLE Experts both load.

    python -m training.mole_expert --part face --checkpoint sd15.safetensors --data faces/ \\
        --output models/loras/mole_face.safetensors --steps 30000 --lr 2e-5
    accelerate launch -m training.mole_expert ...   (same arguments)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/mole_expert.py)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch

from training import accelerate_setup, base_model, checks, cli, datasets, grad_checkpoint, host, loop

# The MoLE paper's expert settings (rank 256; alpha 64 for the face, 128 for the hand).
PART_DEFAULTS = {"face": {"rank": 256, "alpha": 64.0}, "hand": {"rank": 256, "alpha": 128.0}}
ADAPTER = "default"
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def parse_args(argv=None):
    p = cli.base_parser(
        __doc__.split("\n\n")[0],
        epilog="Paper settings (MoLE): face lr 2e-5, 30k steps, rank 256, alpha 64; hand lr 1e-5, 60k steps, rank 256, alpha 128.",
    )
    g = p.add_argument_group("expert")
    g.add_argument(
        "--part", required=True, help="what the expert is for: face, hand, or any name (written to the file's metadata)"
    )
    g.add_argument("--rank", type=int, default=None, help="LoRA rank (default 256)")
    g.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="LoRA alpha; the expert adds (alpha/rank) up@down x (default 64 for face, 128 for hand, else rank/2)",
    )
    g.add_argument("--save-dtype", choices=tuple(cli.DTYPES), default="fp16")
    g.add_argument(
        "--init-from",
        default=None,
        metavar="FILE",
        help="warm start: begin from an earlier expert (a kohya LoRA of the same layers; its rank and alpha are taken)",
    )
    g.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the check that ComfyUI's LoRA loader maps every layer of the written file",
    )
    args = p.parse_args(argv)
    cli.check_args(args)
    if args.init_from:
        take_rank_and_alpha(args)
    defaults = PART_DEFAULTS.get(args.part, {"rank": 256, "alpha": None})
    args.rank = args.rank or defaults["rank"]
    if args.alpha is None:
        args.alpha = defaults["alpha"] if defaults["alpha"] is not None else args.rank / 2
    if args.rank < 1 or args.alpha <= 0:
        raise SystemExit("error: --rank must be >= 1 and --alpha > 0")
    return args


def take_rank_and_alpha(args) -> None:
    """--init-from: the rank and alpha of the file (from its header and metadata, before any
    model loads), which --rank/--alpha may only repeat."""
    shapes, metadata = checks.safetensors_header(args.init_from, "--init-from")
    ranks = {shape[0] for key, shape in shapes.items() if key.endswith(".lora_down.weight")}
    if len(ranks) != 1:
        checks.fail(
            "--init-from", args.init_from, f"is not a LoRA of one rank (lora_down ranks found: {sorted(ranks)})"
        )
    rank = ranks.pop()
    if args.rank not in (None, rank):
        checks.fail("--init-from", args.init_from, f"has rank {rank}, not --rank {args.rank}")
    args.rank = rank
    if args.alpha is None and "ss_network_alpha" in metadata:
        args.alpha = float(metadata["ss_network_alpha"])


def load_expert_weights(unet, names: dict[str, str], path, alpha: float) -> None:
    """Copy a kohya LoRA's lora_down/lora_up into the peft layers (A, B) named by `names`
    ({module path: kohya name}); every layer must be there, with this run's shapes and alpha."""
    from mixture_core.safetensors_io import load_safetensors

    tensors, _ = load_safetensors(path)
    with torch.no_grad():
        for module_path, name in sorted(names.items()):
            layer = unet.get_submodule(module_path)
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
            if down is None or up is None:
                checks.fail(
                    "--init-from", path, f"has no {name}.lora_down/lora_up: it adapts other layers than this run"
                )
            if down.shape != a.shape or up.shape != b.shape:
                checks.fail(
                    "--init-from",
                    path,
                    f"{name}: shapes {tuple(down.shape)}/{tuple(up.shape)}, this run needs "
                    f"{tuple(a.shape)}/{tuple(b.shape)}",
                )
            file_alpha = tensors.get(f"{name}.alpha")
            if file_alpha is not None and abs(float(file_alpha) - alpha) > 1e-3 * alpha:
                checks.fail("--init-from", path, f"{name}: alpha {float(file_alpha)}, this run has --alpha {alpha}")
            a.copy_(down.to(a.dtype))
            b.copy_(up.to(b.dtype))


def comfy_key_map(base: base_model.Base) -> dict:
    """ComfyUI's LoRA key map of the base UNet (taken before peft changes the module tree)."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(base.model_patcher.model, {})


def check_loads_in_comfyui(lora_sd: dict, key_map: dict, expected_weights: set[str], path=None) -> int:
    """Load a LoRA state dict the way ComfyUI's LoraLoader does (convert_lora, load_lora on the
    model's key map) and check that it patches exactly `expected_weights` with no key left over.
    Returns the number of patched weights; raises RuntimeError otherwise."""
    import logging

    import comfy.lora
    import comfy.lora_convert

    unmatched = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("lora key not loaded"):
                unmatched.append(msg.split(": ", 1)[-1])

    handler = Catch(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora_sd)), key_map, log_missing=True)
    finally:
        root.removeHandler(handler)
    patched = set(patches)
    if unmatched or patched != expected_weights:
        raise RuntimeError(
            f"{path or 'the LoRA'}: ComfyUI's LoRA loader patched {len(patched)} of {len(expected_weights)} layers; "
            f"{len(unmatched)} key(s) unmatched (first: {unmatched[:3]}), missing: {sorted(expected_weights - patched)[:3]}"
        )
    return len(patched)


def inject_lora(unet: torch.nn.Module, targets, rank: int, alpha: float) -> dict[str, torch.nn.Parameter]:
    """peft LoRA on exactly the given module paths of the ComfyUI UNet; returns the trainable
    parameters by name. peft initialises down (A) kaiming-uniform and up (B) to zero, so the
    expert starts as the identity."""
    from peft import LoraConfig, inject_adapter_in_model

    base_model.freeze(unet)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0, bias="none", init_lora_weights=True
    )
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    trainable = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)
    got = {n.rsplit(".lora_", 1)[0] for n in trainable}
    if got != set(targets):
        raise RuntimeError(f"peft adapted {len(got)} layers, expected {len(targets)}: {sorted(set(targets) ^ got)[:5]}")
    return trainable


def kohya_state_dict(unet, names: dict[str, str], alpha: float, dtype) -> dict[str, torch.Tensor]:
    """The peft LoRA of every module in `names` in kohya's layout:
    <name>.lora_down.weight (rank, d_in[,1,1]), <name>.lora_up.weight (d_out, rank[,1,1]), <name>.alpha."""
    sd = {}
    for path, name in sorted(names.items()):
        layer = unet.get_submodule(path)
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        sd[f"{name}.lora_down.weight"] = down.to(dtype).contiguous().cpu()
        sd[f"{name}.lora_up.weight"] = up.to(dtype).contiguous().cpu()
        sd[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return sd


def main(argv=None) -> loop.Result:
    args = parse_args(argv)
    accelerator = accelerate_setup.make_accelerator(args)
    samples = datasets.scan_data(args)
    checks.require_family(args.checkpoint, ("sd15", "sdxl"))
    if args.init_from:
        checks.lora_file(args.init_from, "--init-from")
    with host.host_session():
        base = base_model.load_base(args.checkpoint)
        targets = base_model.expert_target_layers(base.unet)
        names = base_model.kohya_names(base, targets)
        key_map = comfy_key_map(base)
        expected = {f"diffusion_model.{p}.weight" for p in targets}
        loop.log.info(
            "expert '%s': LoRA rank %d alpha %g on %d %s layers",
            args.part,
            args.rank,
            args.alpha,
            len(targets),
            base.family,
        )

        trainable = inject_lora(base.unet, targets, args.rank, args.alpha)
        if args.init_from:
            load_expert_weights(base.unet, names, args.init_from, args.alpha)
        base_model.cast_frozen(base.unet, cli.weight_dtype(args))
        if args.gradient_checkpointing:
            grad_checkpoint.enable_gradient_checkpointing(base.unet)
        save_dtype = cli.DTYPES[args.save_dtype]
        unet = base.unet

        def write_output(path, step):
            from safetensors.torch import save_file

            sd = kohya_state_dict(unet, names, args.alpha, save_dtype)
            if args.verify:
                check_loads_in_comfyui(sd, key_map, expected, path)
            metadata = {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(args.rank),
                "ss_network_alpha": str(args.alpha),
                "ss_base_model_version": BASE_MODEL_VERSION.get(base.family, base.family),
                "ss_steps": str(step),
                "ss_learning_rate": str(args.lr),
                "ss_resolution": f"({args.resolution}, {args.resolution})",
                "mole.stage": "expert",
                "mole.part": args.part,
                "mole.base_family": base.family,
                "mole.layers": str(len(names)),
                "mole.training_args": json.dumps(
                    {k: v for k, v in vars(args).items() if k not in ("data", "checkpoint", "output", "work_dir")},
                    default=str,
                ),
            }
            save_file(sd, path, metadata)

        stage = loop.Stage(f"expert-{args.part}", unet, trainable, write_output)
        result = loop.train(args, accelerator, base, stage, samples)
    accelerate_setup.end_accelerator(accelerator)
    return result


if __name__ == "__main__":
    main()
