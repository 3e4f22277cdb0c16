"""The README's flag tables, generated from the typed configs (``python -m wan_grpo.docs``).

A test checks that README.md contains exactly this text, so the README and ``--help`` agree.
"""

from __future__ import annotations

import dataclasses

from wan_grpo.config import help_text


def _table(cls, skip=()) -> list[str]:
    lines = ["| flag / YAML key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = "" if f.default is None else f"`{f.default}`"
        lines.append(f"| `--{f.name}` | {default} | {help_text(f).replace('|', '/')} |")
    return lines


def flag_tables() -> str:
    from wan_grpo.config import ModelConfig, SampleConfig
    from wan_grpo.convert import ConvertConfig
    from wan_grpo.evaluate import EvalConfig
    from wan_grpo.export import ExportConfig
    from wan_grpo.grpo.config import PolicyConfig, TrainConfig
    from wan_grpo.plan import PlanConfig
    from wan_grpo.rewards.config import RewardConfig
    from wan_grpo.score import ScoreConfig
    from wan_grpo.serve import ServerConfig
    from wan_grpo.sft.config import SFTConfig

    shared = {f.name for f in dataclasses.fields(ModelConfig)}
    rewards = {f.name for f in dataclasses.fields(RewardConfig)}
    policy = {f.name for f in dataclasses.fields(PolicyConfig)}
    out = ["### Model and sampling (sample, train, eval)", "", *_table(ModelConfig), "",
           "### Rewards (train, eval, score, reward-server)", "", *_table(RewardConfig), "",
           "### `sample` only", "", *_table(SampleConfig, skip=shared), "",
           "### Training and checkpoints (train, sft)", "", *_table(PolicyConfig, skip=shared), "",
           "### `train` only", "", *_table(TrainConfig, skip=shared | rewards | policy), "",
           "### `sft` only", "", *_table(SFTConfig, skip=policy - {"save_dir"}), "",
           "### `eval` only", "", *_table(EvalConfig, skip=shared | rewards), "",
           "### `plan` only (it reads --task, --size and --frame_num of the shared flags)", "",
           *_table(PlanConfig, skip=shared), "",
           "### `score` only", "", *_table(ScoreConfig, skip=rewards), "",
           "### `reward-server` only", "", *_table(ServerConfig, skip=rewards), "",
           "### `convert`", "", *_table(ConvertConfig), "",
           "### `export`", "", *_table(ExportConfig)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(flag_tables(), end="")
