"""``make demo``: DiffusionNFT on the Shapes model, then held-out accuracy base -> trained per level.

Runs ``wan-grpo train --config configs/shapes-demo.yaml`` and, for each level, ``wan-grpo eval`` of
the base model and of the trained checkpoint on the held-out prompts (same seeds), whose
``--compare_to`` table gives paired deltas with standard errors and whose ``compare/grid.mp4``
shows base | trained side by side; a line per level gives each shape's accuracy (a shape the base
never draws is a ceiling on what training can show). Each command is printed before it runs.

``python -m wan_grpo.tasks.shapes.demo [--save_dir runs/demo] [--config FILE] [flags for train...]``
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from wan_grpo.cli import main as cli
from wan_grpo.errors import UserError

CONFIG = Path(__file__).resolve().parents[4] / "configs" / "shapes-demo.yaml"
SAMPLES_PER_PROMPT = {1: 8, 2: 1}  # level 1: 15 held-out prompts x 8 = 120 videos; level 2: 216 x 1


def run(argv: list[str]) -> None:
    print("$ wan-grpo " + shlex.join(argv), flush=True)
    if cli(argv) != 0:
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_dir", default="runs/demo")
    parser.add_argument("--config", default=str(CONFIG))
    args, train_flags = parser.parse_known_args(argv)
    save = Path(args.save_dir)
    run(["train", "--config", args.config, "--save_dir", str(save), *train_flags])
    checkpoints = sorted(save.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise UserError(f"{save} has no checkpoint; the train run did not finish")
    summary = []
    for level, samples in SAMPLES_PER_PROMPT.items():
        common = ["--task", "shapes", "--prompts", f"shapes:{level}:heldout", "--num_samples", str(samples)]
        base, trained = save / f"eval-base-level{level}", save / f"eval-trained-level{level}"
        run(["eval", *common, "--save_dir", str(base)])
        run(["eval", *common, "--lora", str(checkpoints[-1]), "--compare_to", str(base), "--save_dir", str(trained)])
        row = json.loads((trained / "compare.json").read_text())["accuracy"]
        summary.append(f"level {level} held-out accuracy: base {row['base']:.3f} +- {row['base_stderr']:.3f} -> "
                       f"trained {row['trained']:.3f} +- {row['trained_stderr']:.3f} ({row['delta']:+.3f} +- "
                       f"{row['delta_stderr']:.3f} paired, {row['n']} videos; +- {row['delta_prompt_stderr']:.3f} "
                       f"over {row['prompts']} prompts); side by side: "
                       f"{trained / 'compare' / 'grid.mp4'}")
        shapes = [json.loads((d / "eval.json").read_text())["by_attribute"]["shape"] for d in (base, trained)]
        summary.append("  by shape: " + ", ".join(f"{name} {shapes[0].get(name, {}).get('accuracy', math.nan):.2f} -> "
                                                  f"{shapes[1][name]['accuracy']:.2f} ({shapes[1][name]['n']})"
                                                  for name in shapes[1]))
    print("\n".join(["", *summary]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
