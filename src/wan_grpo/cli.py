"""Command line: ``wan-grpo sample | train | sft | eval | plan | score | reward-server | convert | export |
report``."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from wan_grpo.config import add_config_arguments, build_config
from wan_grpo.errors import UserError
from wan_grpo.grpo.preemption import PREEMPTED_EXIT, SIGNALS, Preempted, StopRequests


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line that names the fix (no usage dump)."""

    def error(self, message):
        self.exit(2, f"wan-grpo: error: {message}; see '{self.prog} --help'\n")


# name -> (config class, runner, help); "module:attr" strings so a command imports only what it runs.
COMMANDS = {
    "sample": ("wan_grpo.config:SampleConfig", "wan_grpo.sample:run_sample",
               "Generate one video (unipc, dpm++, euler or sde solver)."),
    "train": ("wan_grpo.grpo.config:TrainConfig", "wan_grpo.grpo.trainer:train",
              "GRPO training of one or both Wan2.2 experts (the main job)."),
    "sft": ("wan_grpo.sft.config:SFTConfig", "wan_grpo.sft.trainer:run_sft",
            "Supervised flow-matching fine-tuning of one or both experts on captioned videos."),
    "eval": ("wan_grpo.evaluate:EvalConfig", "wan_grpo.evaluate:run_eval",
             "Sample a prompt set deterministically and score every video."),
    "plan": ("wan_grpo.plan:PlanConfig", "wan_grpo.plan:run_plan",
             "Estimate accelerator memory per process, loading nothing."),
    "score": ("wan_grpo.score:ScoreConfig", "wan_grpo.score:run_score",
              "Score mp4 files with a reward (VideoAlign by default)."),
    "reward-server": ("wan_grpo.serve:ServerConfig", "wan_grpo.serve:run_server",
                      "Serve a reward over HTTP for train --reward_url."),
    "convert": ("wan_grpo.convert:ConvertConfig", "wan_grpo.convert:run_convert",
                "Write an original-layout Wan2.2 checkpoint in the diffusers layout."),
    "export": ("wan_grpo.export:ExportConfig", "wan_grpo.export:run_export",
               "Write a train or sft checkpoint's LoRA for ComfyUI (original Wan keys) or as diffusers files."),
}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="wan-grpo", description="GRPO reinforcement learning for Wan2.2 video models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (config_cls, _, text) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text)
        if name in ("train", "sft"):
            command.add_argument("--config", help="YAML file whose keys are these flags' names (flags override it).")
        add_config_arguments(command, _load(config_cls))
    report = sub.add_parser("report", help="Plots and an HTML page for a train run.",
                            description="Write SAVE_DIR/report/: PNG plots and index.html.")
    report.add_argument("save_dir", help="The --save_dir of a train run (holds metrics.jsonl).")
    return parser


def main(argv: list[str] | None = None, *, keep_handlers: bool = False) -> int:
    """Run one command; returns the exit status. ``keep_handlers`` (the console entry point) leaves
    train's and sft's stop-signal handlers installed until the process exits, so a SIGTERM that lands
    after the last checkpoint, while the interpreter shuts down, cannot kill it."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from wan_grpo.report import write_report

            write_report(args.save_dir)
        else:
            config_cls, runner, _ = COMMANDS[args.command]
            config = build_config(_load(config_cls), args, config_file=getattr(args, "config", None))
            if args.command in ("train", "sft"):
                stop = StopRequests().__enter__()
                try:
                    _load(runner)(config, stop=stop)
                finally:
                    if not keep_handlers:
                        stop.__exit__(None, None, None)
            else:
                _load(runner)(config)
    except UserError as exc:
        print(f"wan-grpo: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"wan-grpo: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


def program() -> None:
    """The ``wan-grpo`` console script and ``python -m wan_grpo``."""
    code = main(keep_handlers=True)
    if code in (0, PREEMPTED_EXIT):  # the work is saved: a late stop signal must not turn this into a kill
        for sig in SIGNALS:  # (Python restores the default handlers while it shuts down; ignored stays ignored)
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    program()
