"""Metrics sinks: SAVE_DIR/metrics.jsonl (one object per optimizer step), TensorBoard and W&B."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import uuid
from pathlib import Path

from wan_grpo.errors import UserError

log = logging.getLogger("wan_grpo")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


REPORT_TO = ("tensorboard", "wandb", "none")


def report_targets(spec: str) -> set[str]:
    """--report_to as a set; W&B must be installed when named (checked before anything loads)."""
    targets = {t.strip() for t in str(spec).split(",") if t.strip()}
    if not targets or not targets <= set(REPORT_TO) or ("none" in targets and len(targets) > 1):
        raise UserError(f"--report_to {spec!r}: use tensorboard, wandb, tensorboard,wandb or none")
    if "wandb" in targets:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--report_to wandb needs W&B: pip install wandb (or drop wandb)") from None
    return targets - {"none"}


def metrics_writer(cfg, save_dir: str | Path, *, resume_step: int) -> MetricsWriter:
    """The writer a train or sft config asks for."""
    targets = report_targets(cfg.report_to)
    wandb_options = None
    if "wandb" in targets:
        wandb_options = {"project": cfg.wandb_project, "name": cfg.wandb_run_name or Path(save_dir).resolve().name,
                         "config": dataclasses.asdict(cfg)}
    return MetricsWriter(save_dir, tensorboard=cfg.tensorboard and "tensorboard" in targets, resume_step=resume_step,
                         wandb_options=wandb_options)


class MetricsWriter:
    def __init__(self, save_dir: str | Path, *, tensorboard: bool, resume_step: int = 0,
                 wandb_options: dict | None = None):
        self.path = Path(save_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(save_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        self.wandb = None
        if wandb_options is not None:
            import wandb

            # one W&B run per save_dir: a resumed run continues it
            id_file = Path(save_dir) / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(id=run_id, resume="allow", dir=str(save_dir), **wandb_options)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows past the checkpoint so the file reads as one uninterrupted run."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path.parent) if r["step"] <= step]  # a torn last line goes too
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"
                            and math.isfinite(v)}, step=row["step"])

    def write_video(self, path: Path, caption: str, *, step: int) -> None:
        """A sample video (already written to ``path``) to W&B; TensorBoard and metrics.jsonl skip it."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({"sample": wandb.Video(str(path), caption=caption, format="mp4")}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(save_dir: str | Path) -> list[dict]:
    """The rows of SAVE_DIR/metrics.jsonl. A torn last line (a run killed mid-write) is skipped with a
    warning; a damaged line elsewhere, or a row without ``step``, is a one-line error."""
    path = Path(save_dir) / "metrics.jsonl"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                log.warning("%s: skipping its torn last line %d (a run stopped while writing it)", path, n)
                break
            raise UserError(f"{path}:{n} is not a JSON object; delete or fix that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserError(f"{path}:{n} has no integer 'step'; delete or fix that line")
        rows.append(row)
    return rows


def log_row(row: dict, *, nft: bool = False) -> None:
    """One line per optimizer step. The PPO ratio and clip fraction are GRPO's; an NFT row (no ratio: they
    are NaN) shows how far the policy has moved from its old copy instead (NaN on a skipped update)."""
    if nft:
        policy = f"old_dev {row.get('old_deviation', math.nan):.3g}"
    else:
        policy = f"ratio {row['ratio_mean']:.6f}  clip {row['clipfrac']:.3f}"
    log.info("step %d  reward %.4f +- %.4f  loss %.3g  %s  grad %.3g/%.3g  (rollout %.1fs reward %.1fs train %.1fs)",
             row["step"], row["reward_mean"], row["reward_std"], row["loss"], policy, row["grad_norm_high"],
             row["grad_norm_low"], row["rollout_seconds"], row["reward_seconds"], row["train_seconds"])


def print_summary(save_dir: Path) -> None:
    """Mean reward of the first and last (up to) 10 optimizer steps of the whole run."""

    rewards = [row["reward_mean"] for row in read_metrics(save_dir) if row.get("reward_mean") is not None]
    if len(rewards) >= 2:
        n = min(10, len(rewards) // 2)
        first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
        print(f"reward_mean: first {n} steps {first:.4f} -> last {n} steps {last:.4f} ({last - first:+.4f})")
