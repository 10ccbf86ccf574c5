"""`dynrefer`: one command for every way in.

    dynrefer describe --checkpoint checkpoints/mini --input regions.jsonl --out out.jsonl
    dynrefer evaluate --checkpoint checkpoints/mini --annotations data/mini/annotations.json --split test
    dynrefer train --config configs/mini.yaml
    dynrefer generate --seed 0 --num-images 8000 --out data/mini
    dynrefer convert --release refcocog_ft.pth --eva-clip eva_clip_psz14.pt --out checkpoints/dynrefer-refcocog
    dynrefer train-proposer --config configs/proposer.yaml
    dynrefer demo [--checkpoint DIR] [--proposer DIR] [--sam facebook/sam-vit-base] [--port 7861]

Each subcommand is the module it names (`python -m dynrefer_core.batch`, `.evaluate`, `.train`, `.data.generate`,
`.convert`, `.proposer_train`; the demo is `demo/app.py` of a source checkout) with the same options.
"""
from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path

COMMANDS = {
    "describe": ("dynrefer_core.batch", "describe regions of many images into JSONL (batched, resumable)"),
    "evaluate": ("dynrefer_core.evaluate", "score a model on annotated regions"),
    "train": ("dynrefer_core.train", "train a model from a YAML config"),
    "generate": ("dynrefer_core.data.generate", "write the generated DynRefer-mini benchmark"),
    "convert": ("dynrefer_core.convert", "build a model folder from the released checkpoint"),
    "train-proposer": ("dynrefer_core.proposer_train", "train the box proposer of 'describe everything'"),
    "demo": (None, "start the Gradio app (from a source checkout)"),
}
DEMO = Path(__file__).resolve().parents[1] / "demo" / "app.py"


def add_view_arguments(ap: argparse.ArgumentParser, seed: int | None = None) -> None:
    """The ViewOptions flags, shared by every command that runs the model on views."""
    from .views import HASH_NAMES, STRATEGIES, TASKS
    from .views.geometry import BOX_ROUNDINGS

    ap.add_argument("--n-views", type=int, default=None, help="views per region (default: the model's n)")
    ap.add_argument("--strategy", default="phash", choices=STRATEGIES)
    ap.add_argument("--ts", type=float, nargs="*", default=None, help="the n-1 context ts for --strategy fixed")
    ap.add_argument("--task", choices=TASKS, default=None,
                    help="--strategy task: use the model's task prior for this task (docs/view-study.md)")
    ap.add_argument("--alpha", type=float, default=1.0, help="score = Hamming / t^alpha")
    ap.add_argument("--hash-name", default="dct", choices=HASH_NAMES, help="the view hash h_t")
    ap.add_argument("--seed", type=int, default=seed, help="seed of --strategy random")
    ap.add_argument("--box-rounding", choices=BOX_ROUNDINGS, default=None,
                    help="how the box is mapped into each view (default: the model's setting)")


def view_options(args: argparse.Namespace, ap: argparse.ArgumentParser):
    """The ViewOptions of `add_view_arguments`' flags, or an argparse error that says what is wrong."""
    from .views import ViewOptions

    if args.strategy == "fixed" and not args.ts:
        ap.error("--strategy fixed needs --ts (n-1 values in [0, 1])")
    if (args.strategy == "task") != (args.task is not None):
        ap.error("--strategy task and --task go together (--task captioning|dense|attributes|recognition)")
    try:
        return ViewOptions(n_views=args.n_views, strategy=args.strategy, ts=args.ts, alpha=args.alpha,
                           hash_name=args.hash_name, seed=args.seed, box_rounding=args.box_rounding, task=args.task)
    except ValueError as err:
        ap.error(str(err))


def usage() -> str:
    lines = ["usage: dynrefer <command> [options]   (dynrefer <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dynrefer: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[command][0]
    if module is None:
        if not DEMO.is_file():
            print(f"dynrefer demo needs a source checkout ({DEMO} is missing): clone the repository and run "
                  "`make demo`", file=sys.stderr)
            return 2
        sys.argv = [str(DEMO), *rest]
        runpy.run_path(str(DEMO), run_name="__main__")
        return 0
    sys.argv = [f"dynrefer {command}", *rest]
    code = importlib.import_module(module).main(rest)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
