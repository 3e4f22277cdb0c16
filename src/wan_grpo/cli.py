"""Command line: ``wan-grpo sample`` and ``wan-grpo train``."""

from __future__ import annotations

import argparse
import logging
import sys

from wan_grpo.config import SampleConfig, add_config_arguments, build_config
from wan_grpo.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line that names the fix (no usage dump)."""

    def error(self, message):
        self.exit(2, f"wan-grpo: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    from wan_grpo.evaluate import EvalConfig
    from wan_grpo.grpo.config import TrainConfig
    from wan_grpo.plan import PlanConfig

    parser = OneLineParser(prog="wan-grpo", description="GRPO reinforcement learning for Wan2.2 video models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    commands = [
        ("sample", SampleConfig, "Generate one video (unipc, euler or sde solver)."),
        ("train", TrainConfig, "GRPO training of one or both Wan2.2 experts (the main job)."),
        ("eval", EvalConfig, "Sample a prompt set deterministically and score every video."),
        ("plan", PlanConfig, "Estimate accelerator memory per process, loading nothing."),
    ]
    for name, config_cls, text in commands:
        command = sub.add_parser(name, help=text, description=text)
        if name == "train":
            command.add_argument("--config", help="YAML file whose keys are these flags' names (flags override it).")
        add_config_arguments(command, config_cls)
    report = sub.add_parser("report", help="Plots and an HTML page for a train run.",
                            description="Write SAVE_DIR/report/: PNG plots and index.html.")
    report.add_argument("save_dir", help="The --save_dir of a train run (holds metrics.jsonl).")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sample":
            from wan_grpo.sample import run_sample

            run_sample(build_config(SampleConfig, args))
        elif args.command == "eval":
            from wan_grpo.evaluate import EvalConfig, run_eval

            run_eval(build_config(EvalConfig, args))
        elif args.command == "plan":
            from wan_grpo.plan import PlanConfig, run_plan

            run_plan(build_config(PlanConfig, args))
        elif args.command == "report":
            from wan_grpo.report import write_report

            write_report(args.save_dir)
        else:
            from wan_grpo.grpo.config import TrainConfig
            from wan_grpo.grpo.trainer import train

            train(build_config(TrainConfig, args, config_file=getattr(args, "config", None)))
    except UserError as exc:
        print(f"wan-grpo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
