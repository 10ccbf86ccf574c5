"""`dynrefer`: one command for every way in.

    dynrefer describe --checkpoint checkpoints/mini --input regions.jsonl --out out.jsonl
    dynrefer evaluate --checkpoint checkpoints/mini --annotations data/mini/annotations.json --split test
    dynrefer train --config configs/mini.yaml
    dynrefer generate --seed 0 --num-images 8000 --out data/mini
    dynrefer convert --release refcocog_ft.pth --eva-clip eva_clip_psz14.pt --out checkpoints/dynrefer-refcocog
    dynrefer demo [--checkpoint DIR] [--port 7861]

Each subcommand is the module it names (`python -m dynrefer_core.batch`, `.evaluate`, `.train`, `.data.generate`,
`.convert`; the demo is `demo/app.py` of a source checkout) with the same options.
"""
from __future__ import annotations

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
    "demo": (None, "start the Gradio app (from a source checkout)"),
}
DEMO = Path(__file__).resolve().parents[1] / "demo" / "app.py"


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
