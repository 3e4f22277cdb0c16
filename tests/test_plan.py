"""`wan-grpo plan`: exact parameter counts on the meta device, and terms that match hand arithmetic."""

import re

import pytest

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


def test_rollout_decode_and_trajectory_terms_and_the_peak():
    """A14B at 832*480*81, LoRA r64 on 8 processes: the issue's 151 GiB with --train_batch_size 4 is
    the update's activations; the rollout, decode and trajectory are now counted too."""
    from wan_grpo.plan import PlanConfig, estimate

    est = estimate(PlanConfig(task="t2v-A14B", size="832*480", frame_num=81, lora_rank=64, nproc=8))
    b = est["bytes"]
    seq = 21 * 30 * 52  # latent frames x (480/16) x (832/16)
    assert est["tokens_per_sample"] == seq
    assert b["trajectory"] == 1 * 41 * 16 * 21 * 60 * 104 * 4  # 1 sample per process, 40 steps + 1, fp32
    t = 2 * seq  # CFG
    assert b["rollout_activations_estimate"] == 2 * t * 5120 * 2 + t * (12 * 5120 + 2 * 13824) * 2
    assert b["vae_decode_estimate"] == 3 * 192 * 4 * 832 * 480 * 4  # the VAE runs in fp32
    held = sum(b[k] for k in ("frozen_weights", "optimizer", "lora_weights_and_grads", "trajectory"))
    assert est["total_bytes"] == held + b["activations_estimate"]  # the update is the largest phase
    assert 150 < est["total_bytes"] / GIB < 153


def _fits(est, memory, key, phase, n):
    from wan_grpo.plan import MARGIN, STATIC

    held = sum(est["bytes"][k] for k in STATIC)
    return held + phase(est["shape"], n) <= MARGIN * memory


@pytest.mark.parametrize("task,size,frames,lora,nproc,gib_,want", [
    ("t2v-A14B", "832*480", 81, 64, 8, 80, {"train_batch_size": 1, "rollout_batch_size": 1, "decode_batch_size": 1}),
    ("ti2v-5B", "832*480", 49, 32, 1, 24, {"train_batch_size": 3, "rollout_batch_size": 7, "decode_batch_size": 6}),
    # one 80 GB GPU holds one A14B expert at a time with --offload_model
    ("t2v-A14B", "832*480", 81, 64, 1, 80, {"train_batch_size": 1, "rollout_batch_size": 3, "decode_batch_size": 8}),
])
def test_auto_batch_sizes_are_the_largest_that_fit(task, size, frames, lora, nproc, gib_, want):
    from wan_grpo.plan import PlanConfig, estimate, rollout_activations, train_activations, vae_decode

    est = estimate(PlanConfig(task=task, size=size, frame_num=frames, lora_rank=lora, nproc=nproc,
                              device_memory_gib=gib_, offload_model=nproc == 1 and task == "t2v-A14B"))
    assert est["auto"] == want
    memory = gib_ * GIB
    samples = est["samples_per_process"]
    for key, phase in (("train_batch_size", train_activations), ("rollout_batch_size", rollout_activations),
                       ("decode_batch_size", vae_decode)):
        n = est["auto"][key]
        assert _fits(est, memory, key, phase, n)
        limit = samples if key != "train_batch_size" else 1024
        assert n == limit or not _fits(est, memory, key, phase, n + 1), key


def test_nothing_fits_is_a_one_line_error_naming_fixes(capsys):
    assert main(["plan", "--task", "ti2v-5B", "--lora_rank", "32", "--device_memory_gib", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing fits in 24 GiB" in err[0] and "--trajectory_on_cpu" in err[0]
    assert "--lora_rank" not in err[0]  # already LoRA


def test_train_resolves_unset_batch_sizes_by_the_device_memory():
    from wan_grpo.grpo.config import TrainConfig
    from wan_grpo.plan import resolve_batch_sizes

    cfg = TrainConfig(task="t2v-A14B", size="832*480", frame_num=81, lora_rank=64, num_generations=8)
    cpu, chosen = resolve_batch_sizes(cfg, nproc=8, device_memory=None)
    assert (cpu.train_batch_size, cpu.rollout_batch_size, cpu.decode_batch_size) == (4, 0, 1)
    gpu, chosen = resolve_batch_sizes(cfg, nproc=8, device_memory=80 * GIB)
    assert chosen == {"train_batch_size": 1, "rollout_batch_size": 1, "decode_batch_size": 1}
    given, chosen = resolve_batch_sizes(TrainConfig(task="t2v-A14B", size="832*480", frame_num=81, lora_rank=64,
                                                    train_batch_size=2), nproc=8, device_memory=80 * GIB)
    assert given.train_batch_size == 2 and "train_batch_size" not in chosen
    # a size given by the user is not re-checked: only the unset ones must fit (here the decode)
    only_decode, chosen = resolve_batch_sizes(TrainConfig(task="t2v-A14B", size="832*480", frame_num=81, lora_rank=64,
                                                          train_batch_size=64, rollout_batch_size=1),
                                              nproc=8, device_memory=80 * GIB)
    assert chosen == {"decode_batch_size": 1} and only_decode.train_batch_size == 64


def test_the_shapes_model_is_planned_with_its_own_vae_compression(capsys):
    """The Shapes VAE compresses time 4x (9 frames -> 3 latent frames), which its task name does not say:
    the plan reads vae/config.json. It counted 9 latent frames (144 tokens, a trajectory 3x too large)."""
    from wan_grpo.plan import PlanConfig, estimate

    est = estimate(PlanConfig(task="shapes", lora_rank=0))  # --task shapes alone plans the shipped base
    assert est["tokens_per_sample"] == 3 * 4 * 4  # latent frames x (64/8/2)^2
    assert est["bytes"]["trajectory"] == 8 * 11 * 16 * 3 * 8 * 8 * 4  # 8 videos, 10 steps + 1, fp32
    assert main(["plan", "--task", "shapes", "--frame_num", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--frame_num 6 is not 4k+1; use e.g. 5" in err[0]
    # the CLI plans what train --task shapes runs: NFT (an old-policy copy, no trajectory), full fine-tuning
    assert main(["plan", "--task", "shapes"]) == 0
    out = capsys.readouterr().out
    assert "(48 tokens per sample), full fine-tuning, 2 expert(s) trained" in out
    assert gib(out, "nft_old_policy") > 0 and gib(out, "trajectory") == 0


def test_the_vae_stride_has_one_fallback(tiny_ckpt, tmp_path, capsys):
    """Without vae/config.json the stride is the task's architecture's, else diffusers' default (time 4x, space
    8x): one fallback (plan had a second, no time compression). plan itself refuses such a folder first."""
    import shutil

    from wan_grpo.plan import vae_stride

    folder = tmp_path / "no-vae"
    shutil.copytree(tiny_ckpt, folder, ignore=shutil.ignore_patterns("vae"))
    assert vae_stride(str(folder), "tiny") == (4, 8, 8) == vae_stride(str(tiny_ckpt), "tiny") == vae_stride(None, "x")
    assert vae_stride(str(folder), "ti2v-5B") == (4, 16, 16) == vae_stride(None, "ti2v-5B")
    assert main(["plan", "--ckpt_dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-vae/vae is missing or has no config.json; re-download the checkpoint" in err[0]
