"""One-command GPU check: bf16 parity with diffusers' WanPipeline, one GRPO step's memory and speed against
plan's estimate and the on-paper floor, the bf16 on-policy ratio, and VideoAlign bf16 against fp32.

The model has the real A14B expert dimensions (width 5120, 40 heads, FFN 13824, text width 4096) but
only --blocks of its 40 transformer blocks, random weights, at 832*480 x 81 frames (32,760 tokens per
video); the per-block numbers are extrapolated to 40 blocks. Runs in a few minutes on one H100/H200;
``--smoke`` runs the same code on CPU at toy sizes (CI), recording nothing.

python benchmarks/gpu_check.py [--blocks 2] [--steps 4] [--size 832*480] [--frame_num 81]
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from _common import device_from, parser, record
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from wan_grpo.grpo.loss import ppo_clip_loss
from wan_grpo.grpo.replay import replay_transitions
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.models.files import cast_keeping_fp32
from wan_grpo.models.tiny import build_tiny_components
from wan_grpo.plan import Shape, train_activations
from wan_grpo.sampling.rollout import SamplerConfig, initial_noise, latent_shape, rollout_groups, sample_multistep

A14B = dict(heads=40, head_dim=128, ffn=13824, text_dim=4096, layers=40)
TOY = dict(heads=2, head_dim=16, ffn=64, text_dim=32, layers=40)
SHIFT, G1, G2, TEXT_TOKENS = 5.0, 4.0, 3.0, 512


def experts(dims: dict, blocks: int, device, dtype):
    torch.manual_seed(0)
    out = []
    for _ in range(2):
        m = WanTransformer3DModel(num_attention_heads=dims["heads"], attention_head_dim=dims["head_dim"],
                                  in_channels=16, out_channels=16, text_dim=dims["text_dim"], freq_dim=256,
                                  ffn_dim=dims["ffn"], num_layers=blocks)
        cast_keeping_fp32(m, dtype)
        out.append(m.to(device).eval())
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, repeats: int = 2) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def matmul_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds(lambda: a @ b, device, repeats=5) / 1e12


def block_flops(dims: dict, seq: int) -> float:
    """Forward FLOPs of one block on one CFG pair (2 x seq tokens): its linears and both attentions."""
    d, f, tokens = dims["heads"] * dims["head_dim"], dims["ffn"], 2 * seq
    linear = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * f)  # self q,k,v,o; cross q,o; FFN in, out
    cross_kv = 2 * 2 * TEXT_TOKENS * dims["text_dim"] * d * 2  # cross k, v over the text tokens
    attention = 2 * 4 * seq * seq * d + 2 * 4 * seq * TEXT_TOKENS * d  # QK^T and AV, self and cross
    return linear + cross_kv + attention


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks of the 40 (per expert)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the parity and rollout checks")
    p.add_argument("--size", default="832*480")
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--matmul", type=int, default=8192, help="side of the square bf16 matmul timed for the floor")
    args = p.parse_args()
    dims = A14B
    if args.smoke:
        dims, args.blocks, args.steps, args.size, args.frame_num, args.lora_rank, args.matmul = \
            TOY, 1, 3, "64*64", 9, 4, 256
    device = device_from(args)
    dtype = torch.bfloat16
    width, height = (int(x) for x in args.size.split("*"))
    c = build_tiny_components(0)  # its VAE gives the latent geometry; its text encoder is not used
    c.transformer, c.transformer_2 = experts(dims, args.blocks, device, dtype)
    c.text_encoder.to(device)
    c.vae.to(device)
    shape = latent_shape(c, width=width, height=height, frame_num=args.frame_num)
    seq = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, TEXT_TOKENS, dims["text_dim"], generator=g).to(device, dtype)
    uncond = torch.randn(1, TEXT_TOKENS, dims["text_dim"], generator=g).to(device, dtype)
    rows = []

    # 1. bf16 sampling against diffusers' WanPipeline (UniPC, both experts, CFG)
    noise = initial_noise(shape, generator=torch.Generator("cpu").manual_seed(42), device=device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT)
    pipe = WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, scheduler=scheduler,
                       transformer=c.transformer, transformer_2=c.transformer_2, boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width,
                      num_frames=args.frame_num, num_inference_steps=args.steps, guidance_scale=G1,
                      guidance_scale_2=G2, latents=noise.clone(), output_type="latent").frames.float()
        den = MoEDenoiser(c, guidance_scale=G1, guidance_scale_2=G2, autocast_dtype=dtype)
        ours = sample_multistep(den, noise.clone(), cond, uncond,
                                config=SamplerConfig(solver="unipc", steps=args.steps, shift=SHIFT),
                                scheduler_config=scheduler.config).float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    rows.append(f"| bf16 sampling vs WanPipeline (bf16), {args.steps} UniPC steps | relative error {rel:.2e} |")

    # 2. one GRPO step: LoRA on the low-noise expert, gradient checkpointing, replay of one transition
    from peft import LoraConfig

    low = c.transformer_2
    low.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]))
    lora = [p for n, p in low.named_parameters() if "lora" in n]
    for p_ in lora:
        p_.data = p_.data.float()  # trained weights in fp32, as the trainer keeps them
    low.enable_gradient_checkpointing()
    low.train()
    sampler = SamplerConfig(solver="sde", steps=args.steps, shift=SHIFT, sde_type="flow", noise_level=0.7)
    with torch.no_grad():
        traj = rollout_groups(den, cond, uncond, latent_shape_one=shape, seeds=[7], config=sampler)
    step = int(torch.nonzero((traj.experts == 1) & traj.trainable).flatten()[0])
    s_idx, t_idx = torch.tensor([0]), torch.tensor([step])

    def replay_step():
        low.zero_grad(set_to_none=True)
        out = replay_transitions(den, traj, s_idx, t_idx, cond, uncond, expert=1, device=device)
        loss, _ = ppo_clip_loss(out.log_prob, traj.log_probs[s_idx, t_idx].to(device),
                                torch.ones(1, device=device), 1e-4)
        loss.mean().backward()

    def forward_only():
        with torch.no_grad():
            den.predict_velocity(traj.latents[:1, step].to(device), traj.timesteps[t_idx].to(device), cond, uncond,
                                 expert=1)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    replay_step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        weights = sum(p_.numel() * p_.element_size() for m in (c.transformer, c.transformer_2)
                      for p_ in m.parameters())
        d = dims["heads"] * dims["head_dim"]
        est = weights + sum(p_.numel() for p_ in lora) * 4 + traj.latents.numel() * 4 + train_activations(
            Shape(seq=seq, dim=d, ffn=dims["ffn"], layers=args.blocks, latent=0, steps=args.steps, decode=(0, 1),
                  frames=args.frame_num, pixels=width * height), 1)
        rows.append(f"| peak memory of the step ({args.blocks} blocks) | {peak / 2**30:.2f} GiB measured, "
                    f"{est / 2**30:.2f} GiB by plan's terms (ratio {peak / est:.2f}) |")
    t_fwd = seconds(forward_only, device) / args.blocks
    t_step = seconds(replay_step, device) / args.blocks
    tflops = matmul_tflops(device, dtype, args.matmul)
    floor = block_flops(dims, seq) / (tflops * 1e12)
    rows.append(f"| one block, forward (CFG pair, {seq} tokens each) | {t_fwd:.3f} s; x40 = {40 * t_fwd:.1f} s; "
                f"floor {floor:.3g} s at {tflops:.3g} TFLOP/s (measured / floor {t_fwd / floor:.2f}) |")
    rows.append(f"| one block, replay forward + backward (checkpointed) | {t_step:.3f} s; x40 = {40 * t_step:.1f} s; "
                f"floor {4 * floor:.3g} s (fwd + recompute + 2x bwd; measured / floor {t_step / (4 * floor):.2f}) |")

    # 3. on-policy ratio in bf16: replay every recorded step with the weights that sampled it
    low.eval()
    ratios = []
    with torch.no_grad():
        for t in torch.nonzero(traj.trainable).flatten().tolist():
            e = int(traj.experts[t])
            out = replay_transitions(den, traj, s_idx, torch.tensor([t]), cond, uncond, expert=e, device=device)
            ratios.append(math.exp(float(out.log_prob[0]) - float(traj.log_probs[0, t])))
    dev = max(abs(r - 1) for r in ratios)
    rows.append(f"| bf16 on-policy ratio over {len(ratios)} replayed steps | max abs(r - 1) {dev:.2e}, "
                f"mean {sum(ratios) / len(ratios):.6f} |")

    # 4. VideoAlign (the tiny random VideoReward in the released layout): bf16 against fp32
    from wan_grpo.rewards.videoalign.loading import load_videoreward
    from wan_grpo.rewards.videoalign.scorer import VideoAlignReward
    from wan_grpo.rewards.videoalign.tiny import save_tiny_videoreward

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    path, base = save_tiny_videoreward(tmp / "videoreward")
    videos = [(torch.rand(9, 64, 64, 3, generator=g) * 255).to(torch.uint8) for _ in range(4)]
    prompts = [f"a test video {i}" for i in range(4)]
    scores = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_videoreward(path, base=base, device=device, dtype=dt)
        scores[name] = VideoAlignReward(model, batch_size=4)(videos, prompts, fps=8)
    worst = max((scores["bf16"][k] - scores["fp32"][k]).abs().max().item() for k in scores["fp32"])
    spread = max(scores["fp32"][k].std().item() for k in scores["fp32"])
    rows.append(f"| VideoAlign (tiny) bf16 vs fp32, 4 videos | max abs score difference {worst:.2e} "
                f"(fp32 scores' spread {spread:.2e}) |")

    kind = "toy (smoke)" if args.smoke else "A14B"
    lines = [f"{kind} block dimensions, {args.blocks} of 40 blocks per expert, {width}*{height} x {args.frame_num} "
             f"frames ({seq} tokens), LoRA r{args.lora_rank}, bf16", "", "| check | result |", "|---|---|", *rows]
    record("GPU check", device, lines, args)


if __name__ == "__main__":
    main()
