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
    from wan_grpo.grpo.config import TrainConfig

    parser = OneLineParser(prog="wan-grpo", description="GRPO reinforcement learning for Wan2.2 video models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p_sample = sub.add_parser("sample", help="Generate one video (unipc, euler or sde solver).",
                              description="Generate one video from a prompt.")
    add_config_arguments(p_sample, SampleConfig)
    p_train = sub.add_parser("train", help="GRPO training (the main job).",
                             description="GRPO training of one or both Wan2.2 experts.")
    p_train.add_argument("--config", help="YAML file whose keys are these flags' names (flags override it).")
    add_config_arguments(p_train, TrainConfig)
    from wan_grpo.evaluate import EvalConfig

    p_eval = sub.add_parser("eval", help="Sample a prompt set deterministically and score every video.",
                            description="Evaluate a model (optionally with a train checkpoint) on a prompt set.")
    add_config_arguments(p_eval, EvalConfig)
    from wan_grpo.plan import PlanConfig

    p_plan = sub.add_parser("plan", help="Estimate accelerator memory per process, loading nothing.",
                            description="Memory per process for a training configuration (exact parameter counts).")
    add_config_arguments(p_plan, PlanConfig)
    p_report = sub.add_parser("report", help="Plots and an HTML page for a train run.",
                              description="Write SAVE_DIR/report/: PNG plots and index.html.")
    p_report.add_argument("save_dir", help="The --save_dir of a train run (holds metrics.jsonl).")
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
