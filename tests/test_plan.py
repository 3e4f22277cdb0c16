"""`wan-grpo plan`: exact parameter counts on the meta device, and terms that match hand arithmetic."""

import re

from wan_grpo.cli import main

GIB = 2**30
# The official A14B expert (dim 5120, ffn 13824, 40 layers, 40 heads) built by diffusers' own class.
P = 14_288_491_584
LORA_R64 = 306_708_480  # r * (in + out) over every attention q/k/v/o and both FFN linears


def gib(out, term):
    return float(re.search(rf"{term}\s+([\d.]+) GiB", out).group(1))


def test_lora_r64_both_experts_one_process(capsys):
    assert main(["plan", "--task", "t2v-A14B", "--size", "480*832", "--frame_num", "33", "--lora_rank", "64"]) == 0
    out = capsys.readouterr().out
    assert f"parameters per expert: {P:,}; LoRA parameters per expert: {LORA_R64:,}" in out
    # LoRA r64 by hand: each of the 40 blocks has 8 attention linears 5120->5120 (2 x q,k,v,o),
    # FFN 5120->13824 and 13824->5120: 64 * (8 * 10240 + 2 * 18944) per block
    assert 40 * 64 * (8 * (5120 + 5120) + 2 * (5120 + 13824)) == LORA_R64
    assert gib(out, "frozen_weights") == round(2 * P * 2 / GIB, 2)  # both experts bf16
    assert gib(out, "optimizer") == round(2 * LORA_R64 * 8 / GIB, 2)  # AdamW m, v in fp32
    assert gib(out, "lora_weights_and_grads") == round(2 * LORA_R64 * 8 / GIB, 2)
    assert gib(out, "trained_weights_and_grads") == 0


def test_full_fine_tuning_on_eight_processes(capsys):
    assert main(["plan", "--task", "t2v-A14B", "--size", "480*832", "--frame_num", "33", "--lora_rank", "0",
                 "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    assert gib(out, "frozen_weights") == 0
    assert gib(out, "trained_weights_and_grads") == round(2 * P * (4 + 4) / 8 / GIB, 2)  # fp32 master + grad
    assert gib(out, "optimizer") == round(2 * P * 8 / 8 / GIB, 2)
    assert "14040 tokens per sample" in out  # 9 latent frames x (832/16) x (480/16)


def test_train_prints_the_same_estimate_at_start_up():
    """train's start-up lines are plan's, for the resolved train settings and process count."""
    from wan_grpo.grpo.config import TrainConfig
    from wan_grpo.plan import train_estimate

    cfg = TrainConfig(task="t2v-A14B", size="480*832", frame_num=33, lora_rank=64)
    out = "\n".join(train_estimate(cfg, nproc=1))
    assert f"LoRA parameters per expert: {LORA_R64:,}" in out
    assert gib(out, "optimizer") == round(2 * LORA_R64 * 8 / GIB, 2)
    out8 = "\n".join(train_estimate(TrainConfig(task="t2v-A14B", size="480*832", frame_num=33, lora_rank=0), nproc=8))
    assert gib(out8, "optimizer") == round(2 * P * 8 / 8 / GIB, 2)
