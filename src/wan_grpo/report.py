"""``wan-grpo report SAVE_DIR``: PNG plots of a train run and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from wan_grpo.errors import UserError
from wan_grpo.grpo.metrics import read_metrics

PLOTS = {
    "rewards": ("Reward per component", lambda k: k == "reward_mean" or (k.startswith("reward_") and
                                                                         k.endswith("_mean"))),
    "eval": ("Held-out evaluation", lambda k: k.startswith("eval_") and k.endswith("_mean")),
    "policy": ("Policy update", lambda k: k in ("approx_kl", "kl", "clipfrac", "advantage_abs_mean")),
    "gradients": ("Gradient norm per expert", lambda k: k.startswith("grad_norm_")),
    "timing": ("Seconds per phase", lambda k: k.endswith("_seconds")),
}


def _plot(rows: list[dict], keys: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(save_dir: str | Path) -> Path:
    save_dir = Path(save_dir)
    if not (save_dir / "metrics.jsonl").is_file():
        raise UserError(f"{save_dir} has no metrics.jsonl; pass the --save_dir of a train run")
    rows = read_metrics(save_dir)
    if not rows:
        raise UserError(f"{save_dir}/metrics.jsonl is empty; run at least one training step")
    out = save_dir / "report"
    out.mkdir(exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    images = []
    for name, (title, wanted) in PLOTS.items():
        chosen = [k for k in keys if wanted(k)]
        if chosen:
            _plot(rows, chosen, title, out / f"{name}.png")
            images.append((title, out / f"{name}.png"))
    last = rows[-1]
    rewards = [r["reward_mean"] for r in rows if isinstance(r.get("reward_mean"), (int, float))]
    if len(rewards) >= 2:
        n = min(10, len(rewards) // 2)  # means over rows that have a reward (skipped steps log null)
        first_mean, last_mean = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
        summary = (f"Mean reward, first {n} scored steps {first_mean:.4f}, last {n} scored steps {last_mean:.4f} "
                   f"({last_mean - first_mean:+.4f}).")
    else:
        summary = f"{len(rewards)} step(s) with a reward: too few to compare first and last."
    samples = sorted((save_dir / "samples").glob("*.mp4")) if (save_dir / "samples").is_dir() else []
    parts = [
        "<!doctype html><meta charset='utf-8'><title>wan-grpo report</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}td,th{padding:2px 8px}</style>",
        f"<h1>wan-grpo run: {html.escape(str(save_dir))}</h1>",
        f"<p>{len(rows)} optimizer steps. {summary}</p>",
        "<h2>Last step</h2><table>",
        *[f"<tr><th align=left>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>"
          for k, v in last.items()],
        "</table>",
    ]
    for title, path in images:  # embedded, so the page is one self-contained file
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{data}'>")
    if samples:
        parts.append("<h2>Samples</h2>")
        parts += [f"<p><a href='../samples/{s.name}'>{s.name}</a><br><video controls loop width=256 "
                  f"src='../samples/{s.name}'></video></p>" for s in samples]
    (out / "index.html").write_text("\n".join(parts))
    print(f"report: {out / 'index.html'} ({len(images)} plots)")
    return out
