"""The README stays true: its flag tables are the configs' and every flag it names exists."""

import re
from pathlib import Path

from wan_grpo.cli import build_parser
from wan_grpo.docs import flag_tables

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def cli_flags() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {name: {opt for a in p._actions for opt in a.option_strings if opt.startswith("--")}
            for name, p in sub.choices.items()}


def test_flag_tables_are_generated_from_the_configs():
    assert flag_tables() in README, "regenerate with: python -m wan_grpo.docs"


def benchmark_flags(monkeypatch) -> set[str]:
    """The flags every benchmark script shares (benchmarks/_common.parser), which the README may name."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _common

    return {opt for a in _common.parser("")._actions for opt in a.option_strings if opt.startswith("--")}


def test_every_cli_flag_is_documented_and_every_documented_flag_exists(monkeypatch):
    flags = cli_flags()
    every = set().union(*flags.values())
    documented = set(re.findall(r"(--[a-z][a-z0-9_]*)", README))
    missing = {f for f in every if f not in documented and f != "--help"}
    assert not missing, f"flags missing from README: {sorted(missing)}"
    # torchrun's, and the benchmark scripts' shared ones
    unknown = documented - every - {"--help", "--nproc_per_node"} - benchmark_flags(monkeypatch)
    assert not unknown, f"README names flags the CLI lacks: {sorted(unknown)}"
    assert "--config" in flags["train"]


def test_every_command_help_renders_every_flag():
    """`wan-grpo CMD --help` formats (argparse %-formats help: a bare % in a help text crashed it)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    flags = cli_flags()
    for name, command in sub.choices.items():
        text = command.format_help()
        assert all(flag in text for flag in flags[name]), name
    assert "90% of its memory" in sub.choices["train"].format_help()


def test_quick_start_commands_are_make_targets():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
