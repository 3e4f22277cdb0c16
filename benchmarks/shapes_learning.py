"""Shapes learning curves: held-out (or validation) accuracy against rollouts and CPU time, per setting.

Each setting trains on one level's training prompts from the Shapes base model, once per seed,
saving checkpoints at --evals evenly spaced rollouts; every checkpoint (and the base) is evaluated
with ``wan-grpo eval`` (UniPC, fixed seeds, --num_samples videos per prompt) on --split. The table
gives, per setting and checkpoint, the accuracy averaged over seeds (+- the standard error over seeds,
or within the one seed's videos) and the mean of the paired per-video change from the base, with its
standard error over prompts (each video's change averaged over seeds, a prompt's videos one cluster:
the error of a claim about prompts, which the spread over seeds leaves out); a PNG plots accuracy
against training minutes. Choose settings on --split val; report --split heldout.
Rerunning with the same --work reuses finished runs and evals and resumes a run that was stopped, so
a grid can be spread over several sittings.

python benchmarks/shapes_learning.py --settings grpo,nft --seeds 0,1,2 --rollouts 60 --level 1 --split val
python benchmarks/shapes_learning.py --settings nft,grpo --rollouts 30,grpo=69 ...   # GRPO runs 69 rollouts
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import DOCS, parser, record

from wan_grpo.evaluate import prompt_stderr, stderr
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.tasks.shapes import BASE_DIR

COMMON = ["--batch_size", "8", "--num_generations", "8", "--tensorboard", "false", "--log_interval", "0"]


def replaced(flags: list[str], **values: str) -> list[str]:
    """A copy of `flags` with the values of the named flags changed, so no flag is given twice."""
    out = list(flags)
    for name, value in values.items():
        assert out.count(f"--{name}") == 1, f"--{name} must be in {flags} once"
        out[out.index(f"--{name}") + 1] = value
    return out


# the base lists the other settings vary (a flag given twice would be ambiguous in the record)
NFT_HIGH_K3 = ["--algorithm", "nft", "--lora_rank", "0", "--train_experts", "high", "--learning_rate", "1e-4",
               "--timestep_fraction", "1.0", "--train_batch_size", "32", "--optimizer_steps_per_rollout", "3"]
NFT_K6_D2 = [*replaced(NFT_HIGH_K3, train_experts="both", optimizer_steps_per_rollout="6"), "--nft_noise_draws", "2"]
GRPO = ["--algorithm", "grpo", "--lora_rank", "0", "--learning_rate", "1e-4"]
GRPO_WINDOW = [*GRPO, "--sde_window", "0:3"]
GUARD = ["--ratio_norm", "true", "--reweight_steps", "true", "--clip_range", "2e-6"]
SETTINGS = {
    "grpo": GRPO,
    "grpo-window": GRPO_WINDOW,
    "grpo-dance": [*GRPO, "--sde_type", "dance", "--noise_level", "0.3"],
    "grpo-cps": [*GRPO, "--sde_type", "cps"],
    "grpo-guard": [*GRPO, *GUARD],
    "grpo-window-lr3e-4": replaced(GRPO_WINDOW, learning_rate="3e-4"),
    "grpo-window-lr1e-3": replaced(GRPO_WINDOW, learning_rate="1e-3"),
    "grpo-window-guard": [*GRPO_WINDOW, *GUARD],
    "grpo-window-k3": [*GRPO_WINDOW, "--optimizer_steps_per_rollout", "3"],
    "grpo-window-guard-k3": [*GRPO_WINDOW, "--optimizer_steps_per_rollout", "3", *GUARD],
    "grpo-lora": ["--algorithm", "grpo", "--lora_rank", "16", "--lora_alpha", "32", "--learning_rate", "1e-3"],
    "nft": ["--algorithm", "nft", "--lora_rank", "0", "--learning_rate", "1e-4", "--timestep_fraction", "0.3",
            "--train_batch_size", "32"],
    "nft-high": ["--algorithm", "nft", "--lora_rank", "0", "--train_experts", "high", "--learning_rate", "1e-4",
                 "--timestep_fraction", "1.0", "--train_batch_size", "32"],
    "nft-high-k3": NFT_HIGH_K3,
    # CFG-free rollouts (one model call per step instead of two); evaluations keep the preset's guidance
    "nft-high-k3-cfg1": [*NFT_HIGH_K3, "--guidance_scale", "1"],
    "nft-high-k3-partial": [*NFT_HIGH_K3, "--shapes_coefs", "accuracy=1,partial=1"],
    "nft-high-k3-fill": [*NFT_HIGH_K3, "--shapes_coefs", "accuracy=1,partial=1,fill=1"],
    "nft-low-k3-fill": [*replaced(NFT_HIGH_K3, train_experts="low"), "--shapes_coefs", "accuracy=1,fill=1"],
    "nft-high-k3-lr3e-4": replaced(NFT_HIGH_K3, learning_rate="3e-4"),
    "nft-high-k3-lr1e-3": replaced(NFT_HIGH_K3, learning_rate="1e-3"),
    # both experts: the low-noise one draws edges and colours, where a better-drawing base's errors are
    "nft-k3": replaced(NFT_HIGH_K3, train_experts="both"),
    "nft-k3-lr3e-4": replaced(NFT_HIGH_K3, train_experts="both", learning_rate="3e-4"),
    # the rate decays to 0 at the run's last rollout: does the level-2 gain then keep its peak? (A rerun with more
    # --rollouts resumes it on a longer schedule, so the rate rises again: give it a new --work.)
    "nft-k3-cosine": [*replaced(NFT_HIGH_K3, train_experts="both"), "--lr_schedule", "cosine"],
    # each rollout's transitions twice (two noise draws), in twice the optimizer steps of nft-k3's size: sampling
    # is 60% of a rollout's time, so more updates per rollout cost 1.3x
    "nft-k6-d2": NFT_K6_D2,
    # the same transitions and draws as nft-k6-d2 (so the same cost) in 10 optimizer steps: one noise level each
    "nft-k10-d2": replaced(NFT_K6_D2, optimizer_steps_per_rollout="10"),
    # nft-k6-d2 held near the base: a KL to it, sized to match the policy gradient once the velocities differ
    # by about 0.05 rms (does it keep level 1's red circles, which nft-k6-d2 makes ragged?)
    "nft-k6-d2-kl10": [*NFT_K6_D2, "--kl_coef", "10"],
    # kl10 held everything at the base; kl1 is --task shapes's default (TRAIN_DEFAULTS; tests/test_presets.py)
    "nft-k6-d2-kl1": [*NFT_K6_D2, "--kl_coef", "1"],
    # the graded shape checks beside accuracy: what --task shapes trains on level-2 prompts (LEVEL2_SHAPES_COEFS)
    "nft-k6-d2-kl1-shape": [*NFT_K6_D2, "--kl_coef", "1", "--shapes_coefs", "accuracy=1,shape=1,fill=1"],
    # between the two: does level 2 keep more of nft-k6-d2's gain (kl1 gave up about half of it on held-out)?
    "nft-k6-d2-kl0.3": [*NFT_K6_D2, "--kl_coef", "0.3"],
    # partial credit beside accuracy on level 2: about half of its groups of 8 score all 0 (or all 1) on accuracy
    # and so teach nothing, while their colour, shape and relation checks still differ
    "nft-k6-d2-partial": [*NFT_K6_D2, "--shapes_coefs", "accuracy=1,partial=1"],
    # nft-k6-d2 without the groups whose rewards are all equal (about half of level 2's): their advantage is 0, so
    # they only pull the policy back to the old one, and leaving them out shortens each optimizer step
    "nft-k6-d2-drop": [*NFT_K6_D2, "--drop_zero_std_groups", "true"],
    # nft-k6-d2 with four noise draws per transition: a lower-variance gradient for 2x nft-k6-d2's train time
    "nft-k6-d4": replaced(NFT_K6_D2, nft_noise_draws="4"),
    # graded shape beside accuracy: a square no sample passes still has a fill to climb
    "nft-k3-fill": [*replaced(NFT_HIGH_K3, train_experts="both"), "--shapes_coefs", "accuracy=1,fill=1"],
    "nft-lora": ["--algorithm", "nft", "--lora_rank", "16", "--lora_alpha", "32", "--learning_rate", "1e-3",
                 "--timestep_fraction", "0.3", "--train_batch_size", "32"],
}
SMOKE = ["--task", "tiny", "--reward", "shapes", "--size", "64*64", "--frame_num", "9", "--sampling_steps", "4",
         "--batch_size", "1", "--num_generations", "2", "--tensorboard", "false", "--log_interval", "0"]


def wan_grpo(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "wan_grpo", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"wan-grpo {' '.join(args[:1])} failed:\n{out.stderr[-3000:]}")


COMPONENTS = ("colour", "shape", "motion", "relation", "clean")  # beside accuracy; clean is never trained


def evaluate(model: list[str], prompts: str, out: Path, samples: int, lora: Path | None = None) -> list[float]:
    """Per-video accuracy, in (prompt, seed) order; the other components' means go to ``MEANS[out]``.
    An eval already in ``out`` of the same prompts, videos per prompt and checkpoint is read, not rerun."""
    done = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else None
    tail = lambda path: Path(path).parts[-2:] if path else None  # noqa: E731 (run/checkpoint: a copied --work counts)
    same = done is not None and (done["config"].get("prompts"), done["config"].get("num_samples"),
                                 tail(done["config"].get("lora"))) == (prompts, samples, tail(lora))
    if not same:
        extra = ["--lora", str(lora)] if lora else []
        wan_grpo("eval", *model, "--prompts", prompts, "--num_samples", str(samples), "--save_dir", str(out), *extra)
    videos = json.loads((out / "eval.json").read_text())["videos"]
    MEANS[out] = {c: statistics.mean(v[c] for v in videos if v.get(c) is not None)
                  for c in COMPONENTS if any(v.get(c) is not None for v in videos)}
    return [v["accuracy"] for v in videos]


MEANS: dict[Path, dict[str, float]] = {}


def _components(paths: list[Path]) -> str:
    """Each component's mean over the runs' evals, e.g. 'colour 0.84, shape 0.59, motion 0.38, clean 0.99'."""
    names = [c for c in COMPONENTS if all(c in MEANS[p] for p in paths)]
    return ", ".join(f"{c} {statistics.mean(MEANS[p][c] for p in paths):.2f}" for c in names)


def steps_per_rollout(setting: list[str]) -> int:
    flag = "--optimizer_steps_per_rollout"
    return int(setting[setting.index(flag) + 1]) if flag in setting else 1


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--settings", default="grpo,nft", help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rollouts", default="60",
                   help="rollouts per run: N, or N,SETTING=M,... to give some settings M (e.g. GRPO's 30 minutes)")
    p.add_argument("--evals", type=int, default=3, help="checkpoints evaluated per run, evenly spaced")
    p.add_argument("--level", type=int, default=1, choices=(1, 2))
    p.add_argument("--split", default="val", choices=("val", "heldout"))
    p.add_argument("--num_samples", type=int, default=8)
    p.add_argument("--ckpt_dir", default=str(BASE_DIR))
    p.add_argument("--work", default="runs/shapes-learning")
    p.add_argument("--plot", default=None, help="PNG name, under docs/ with --record, else under --work "
                                                "(default shapes-learning-lLEVEL-SPLIT.png)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shapes-learning-")) if args.smoke else Path(args.work)
    if args.smoke:
        args.settings, args.seeds, args.rollouts, args.evals, args.num_samples = "grpo,nft", "0", "2", 1, 1
        model, common = ["--task", "tiny", "--reward", "shapes", "--size", "64*64", "--frame_num", "9",
                         "--sampling_steps", "4"], SMOKE
    else:
        model, common = ["--ckpt_dir", args.ckpt_dir], ["--ckpt_dir", args.ckpt_dir, *COMMON]
    prompts = f"shapes:{args.level}:{args.split}"
    train_prompts = f"shapes:{args.level}:train"
    rollouts = _rollouts(args.rollouts, args.settings.split(","))
    base = evaluate(model, prompts, work / "base", args.num_samples)
    results = {}  # setting -> rollouts -> [(seed, accuracies, minutes)]
    evals = {}  # (setting, rollouts) -> eval folders
    for seed in (int(s) for s in args.seeds.split(",")):  # seeds outermost: a cut-short grid still compares settings
        for name in args.settings.split(","):
            run = work / f"{name}-seed{seed}"
            k, last = steps_per_rollout(SETTINGS[name]), rollouts[name]
            every = max(1, last // args.evals)  # a longer rerun resumes the shorter run and adds its checkpoints
            done = [int(c.name.split("-")[1]) for c in run.glob("checkpoint-*")]
            if max(done, default=0) < last * k:  # a grid cut short goes on where it stopped
                wan_grpo("train", *common, *SETTINGS[name], "--prompts", train_prompts, "--seed", str(seed),
                         "--max_steps", str(last * k), "--num_epochs", "1000",
                         "--save_interval", str(every * k), "--save_dir", str(run), "--resume", "auto")
            per_rollout = {r["rollout"]: r for r in read_metrics(run)}  # k rows per rollout share its timings
            for ckpt in sorted(run.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1])):
                step = int(ckpt.name.split("-")[1]) // k  # rollouts
                if step > last:  # a longer earlier run in the same --work
                    continue
                minutes = sum(r["rollout_seconds"] + r["reward_seconds"] + r["train_seconds"]
                              for n, r in per_rollout.items() if n <= step) / 60
                acc = evaluate(model, prompts, run / f"eval-{step}", args.num_samples, ckpt)
                results.setdefault(name, {}).setdefault(step, []).append((seed, acc, minutes))
                evals.setdefault((name, step), []).append(run / f"eval-{step}")
    base_mean = statistics.mean(base)
    lines = [f"Level {args.level}, {args.split} prompts, {args.num_samples} videos per prompt; base accuracy "
             f"{base_mean:.3f} +- {stderr(base):.3f} ({_components([work / 'base'])})", "",
             "| setting | rollouts | train minutes | accuracy | paired change from base | change +- over prompts "
             "| seeds | components |",
             "|---|---|---|---|---|---|---|---|"]
    prompt_of = [i // args.num_samples for i in range(len(base))]  # the evals' videos come in (prompt, seed) order
    for name, by_step in results.items():
        for step, runs in sorted(by_step.items()):
            means = [statistics.mean(acc) for _, acc, _ in runs]
            changes = [statistics.mean(a - b for a, b in zip(acc, base)) for _, acc, _ in runs]
            spread = stderr(means) if len(runs) > 1 else stderr(runs[0][1])
            change_se = stderr(changes) if len(runs) > 1 else stderr([a - b for a, b in zip(runs[0][1], base)])
            # each video's change averaged over seeds, then the error with a prompt's videos as one cluster: the
            # spread over seeds leaves out which prompts the split happens to hold
            per_video = [statistics.mean(acc[i] - base[i] for _, acc, _ in runs) for i in range(len(base))]
            lines.append(f"| {name} | {step} | {statistics.mean(m for *_, m in runs):.1f} | "
                         f"{statistics.mean(means):.3f} +- {spread:.3f} | {statistics.mean(changes):+.3f} +- "
                         f"{change_se:.3f} | {prompt_stderr(per_video, prompt_of):.3f} | {len(runs)} | "
                         f"{_components(evals[(name, step)])} |")
    if not args.smoke:
        _plot(results, base_mean, (DOCS.parent if args.record else work) /
              (args.plot or f"shapes-learning-l{args.level}-{args.split}.png"))
    record(f"Shapes learning, level {args.level} ({args.split})", _cpu(), lines, args)


def _rollouts(spec: str, settings: list[str]) -> dict[str, int]:
    """'30,grpo-window=69' -> {setting: rollouts}."""
    default, given = None, {}
    for item in spec.split(","):
        name, _, value = item.rpartition("=")
        if name:
            if name not in settings:
                raise SystemExit(f"--rollouts {item}: {name} is not in --settings")
            given[name] = int(value)
        else:
            default = int(value)
    if default is None and set(given) != set(settings):
        raise SystemExit("--rollouts: give a number for the settings not named, e.g. 30,grpo-window=69")
    return {name: given.get(name, default) for name in settings}


def _cpu():
    import torch

    return torch.device("cpu")


def _plot(results: dict, base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_step in results.items():
        points = sorted((statistics.mean(m for *_, m in runs), statistics.mean(statistics.mean(a) for _, a, _ in runs))
                        for runs in by_step.values())
        ax.plot([0] + [x for x, _ in points], [base] + [y for _, y in points], marker="o", label=name)
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
