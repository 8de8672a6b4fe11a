"""python3 -m quality {prompts, moa-prompts, generate, score, report} ... (from the pack's folder)."""

from __future__ import annotations

import argparse

from . import generate, moa_protocol, prompts, report, score

COMMANDS = {
    "prompts": (prompts, "build COCO / DiffusionDB Human Prompts (MoLE Sec. 4.1) from the raw caption files"),
    "moa-prompts": (moa_protocol, "write the MoA / FastComposer single-subject prompt set"),
    "generate": (generate, "render a prompt set: base and with the method, fixed seeds, through ComfyUI"),
    "score": (score, "score a rendered run: hps, imagereward, clip, face"),
    "report": (report, "tables (Markdown, CSV) and a plot of a scored run, beside the papers' numbers"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m quality", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
    args = parser.parse_args(argv)
    COMMANDS[args.command][0].main(args)


if __name__ == "__main__":
    main()
