"""Reward selection: ``--reward NAME[:WEIGHT],...`` with built-ins, ``videoalign`` and plug-ins.

``shapes`` is the Shapes task's verifier (wan_grpo.tasks.shapes). A plug-in is
``module.path:callable``: a function ``fn(videos, prompts, *, fps)`` (or a class instantiated with
no arguments whose instances are such callables) returning a float tensor (N,) or a dict of named
components. Every component is logged; the total reward is the weighted sum.
"""

from __future__ import annotations

import importlib
import math

import torch

from wan_grpo.errors import UserError
from wan_grpo.rewards.base import Reward
from wan_grpo.rewards.builtin import BUILTIN, FrameStatReward
from wan_grpo.rewards.remote import RemoteReward, reward_token
from wan_grpo.runtime import resolve_device, resolve_precision
from wan_grpo.tasks.shapes.verifier import DEFAULT_COEFS, ShapesReward, parse_coefs

NAMES = (*BUILTIN, "shapes", "videoalign")


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'brightness:1,pkg.mod:fn:0.5' -> [('brightness', 1.0), ('pkg.mod:fn', 0.5)]; weight defaults to 1."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep:
            try:
                name, weight = head, float(tail)
            except ValueError:
                pass  # module:callable without a weight
        if not math.isfinite(weight):
            raise UserError(f"reward weight of {name!r} is {weight}; give a finite number")
        if name not in NAMES and not _is_plugin(name):
            raise UserError(f"unknown reward {name!r}; --reward takes NAME[:WEIGHT],... with NAME in "
                            f"{', '.join(NAMES)} or a plug-in module.path:callable")
        out.append((name, weight))
    if not out:
        raise UserError("--reward is empty; name at least one reward, e.g. --reward brightness")
    return out


def _is_plugin(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()


class PluginReward:
    """A user reward ``module.path:callable``; a bare tensor result is named after the callable."""

    def __init__(self, target: str):
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"cannot import reward plug-in module {module_name!r} ({exc}); install it or add its "
                            "folder to PYTHONPATH") from exc
        obj = getattr(module, attr, None)
        if obj is None:
            raise UserError(f"module {module_name!r} has no {attr!r}; --reward takes module.path:callable")
        fn = obj() if isinstance(obj, type) else obj
        if not callable(fn):
            raise UserError(f"{target} is not callable; a reward is fn(videos, prompts, *, fps)")
        self.name, self._fn, self._default = target, fn, attr

    def __call__(self, videos, prompts, *, fps) -> dict[str, torch.Tensor]:
        out = self._fn(videos, prompts, fps=fps)
        return dict(out) if isinstance(out, dict) else {self._default: out}


class RewardSet:
    """Several rewards with weights: scores every component and knows each component's coefficient."""

    def __init__(self, entries: list[tuple[Reward, float, dict[str, float]]]):
        self.entries = entries
        self.coefs: dict[str, float] = {}  # declared components now; plug-ins' when they first answer
        for reward, weight, inner in entries:
            for name in getattr(reward, "components", None) or ():
                self.coefs.setdefault(name, weight * inner.get(name, 1.0))

    def __call__(self, videos: list[torch.Tensor], prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        """All components of all rewards, each (N,) float32, checked for shape and duplicate names."""
        out: dict[str, torch.Tensor] = {}
        for reward, weight, inner in self.entries:
            for name, values in reward(videos, prompts, fps=fps).items():
                values = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
                if values.shape != (len(videos),):
                    raise RuntimeError(f"reward {reward.name!r} returned {tuple(values.shape)} scores for "
                                       f"{len(videos)} videos")
                if name in out:
                    raise UserError(f"two rewards both produce a component named {name!r}; drop one of them")
                out[name] = values
                self.coefs.setdefault(name, weight * inner.get(name, 1.0))
        return out

    @property
    def weighted(self) -> list[str]:
        """Components that enter the total and the advantages (coefficient != 0); the others are only
        logged, and may be NaN where they do not apply (e.g. the shapes reward's motion on a level-2 prompt)."""
        return [k for k, c in self.coefs.items() if c != 0]

    def total(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.coefs[k] * components[k] for k in self.weighted)


def reward_names(reward: str | None, *, default: str) -> list[str]:
    """The reward names a run scores with: --reward's, or the task's ``default`` when it is unset."""
    return [name for name, _ in parse_reward_spec(reward or default)]


def check_reward_flags(cfg, *, default: str) -> None:
    """The reward flags' one-line errors, cheap enough to raise before any model loads (``default``: the
    task's reward when --reward is unset)."""
    if cfg.shapes_coefs != DEFAULT_COEFS:  # a weight that would silently do nothing
        if cfg.reward_url:
            raise UserError("--shapes_coefs: with --reward_url the server's coefficients apply; give it to "
                            "'wan-grpo reward-server' instead")
        if "shapes" not in reward_names(cfg.reward, default=default):
            raise UserError("--shapes_coefs weighs the shapes reward's components; add --reward shapes or drop it")
        parse_coefs(cfg.shapes_coefs)
    if cfg.reward_url:
        return
    if "videoalign" in reward_names(cfg.reward, default=default) and not (cfg.vq_coef or cfg.mq_coef or cfg.ta_coef):
        raise UserError("--vq_coef, --mq_coef and --ta_coef are all 0; give VideoAlign a non-zero one")


def build_rewards(cfg, *, default: str, device: torch.device | str = "cpu", drop_failed: bool = False) -> RewardSet:
    """The rewards ``cfg`` (a RewardConfig) names; VideoAlign loads onto ``--reward_device`` or ``device``.

    With ``--reward_url`` the server's rewards and coefficients are used; ``drop_failed`` makes a
    batch the server could not score come back as NaN (the trainer drops those groups) instead of
    raising.
    """
    check_reward_flags(cfg, default=default)
    if cfg.reward_url:
        remote = RemoteReward(cfg.reward_url, timeout=cfg.reward_timeout, retries=cfg.reward_retries,
                              token=reward_token(cfg),
                              drop_on_failure=drop_failed)
        remote.check()
        return RewardSet([(remote, 1.0, remote.coefs)])
    entries = []
    for name, weight in parse_reward_spec(cfg.reward or default):
        if name == "videoalign":
            entries.append((build_videoalign(cfg, device=cfg.reward_device or device), weight,
                            {"VQ": cfg.vq_coef, "MQ": cfg.mq_coef, "TA": cfg.ta_coef}))
        elif name == "shapes":
            shapes = ShapesReward(cfg.shapes_coefs)
            entries.append((shapes, weight, shapes.coefs))
        elif name in BUILTIN:
            entries.append((FrameStatReward(name, BUILTIN[name]), weight, {}))
        else:
            entries.append((PluginReward(name), weight, {}))
    return RewardSet(entries)


def build_videoalign(cfg, *, device: torch.device | str):
    from wan_grpo.rewards.videoalign.loading import load_videoreward
    from wan_grpo.rewards.videoalign.scorer import VideoAlignReward

    if not cfg.reward_model_path:
        raise UserError("--reward videoalign needs --reward_model_path DIR (the downloaded VideoReward folder with "
                        "model_config.json and checkpoint-*/)")

    device = resolve_device(str(device), flag="--reward_device" if cfg.reward_device else "--device")
    precision = resolve_precision(getattr(cfg, "mixed_precision", None), device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    reward = load_videoreward(cfg.reward_model_path, base=cfg.videoalign_base, device=device, dtype=dtype)
    return VideoAlignReward(reward, raw=cfg.reward_raw, batch_size=cfg.reward_batch_size)
