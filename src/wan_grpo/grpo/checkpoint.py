"""Checkpoints: exported experts (diffusers formats), sharded training state (DCP), loop state.

Layout of ``SAVE_DIR/checkpoint-<step>/``:
  transformer/pytorch_lora_weights.safetensors   (LoRA; ``WanPipeline.load_lora_weights`` loads it)
  transformer_2/pytorch_lora_weights.safetensors (load with ``load_into_transformer_2=True``)
  transformer/ or transformer_2/ diffusers model folders (full fine-tuning)
  dcp/               trainable weights + optimizer via torch.distributed.checkpoint: resumable on
                     any number of processes (resharded on load)
  training_state.pt  LR schedule, RNG states, step, data position, counters, prompt-list fingerprint

  MANIFEST.json      every other file's size and sha256, written last

All ranks write their DCP shards into a temporary folder; rank 0 exports the gathered weights,
writes the loop state and the manifest, and renames the folder into place, so a checkpoint-<step>
is complete. ``--resume auto`` verifies the manifest and falls back past a damaged checkpoint to
the previous one; a failed write (full disk, no permission) removes its temporary folder and leaves
every earlier checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from wan_grpo.distributed import all_reduce_sum, barrier
from wan_grpo.errors import UserError
from wan_grpo.grpo.policy import expert_names, lora_targets
from wan_grpo.model_card import model_card
from wan_grpo.models.files import LORA_FILE
from wan_grpo.specs import Expert

log = logging.getLogger("wan_grpo")

STATE_FILE = "training_state.pt"
MANIFEST = "MANIFEST.json"
SLOW_WRITE_ENV = "WAN_GRPO_TEST_CHECKPOINT_DELAY"  # tests only: seconds to pause inside a checkpoint write
SHARDED = StateDictOptions(ignore_frozen_params=True, strict=False)
GATHERED = StateDictOptions(ignore_frozen_params=True, full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _export_expert(expert, weights: dict[str, torch.Tensor], folder: Path, *, lora: bool) -> None:
    """``weights``: the expert's gathered trainable tensors, keyed as in expert.state_dict()."""
    folder.mkdir(parents=True)
    if lora:
        from diffusers import WanPipeline
        from peft.utils import get_peft_model_state_dict

        metadata = expert.peft_config["default"].to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])  # peft keeps a set: same bytes every run
        WanPipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(expert, state_dict=weights),
            transformer_lora_adapter_metadata=metadata,
        )
    else:
        expert.save_config(folder)
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "diffusion_pytorch_model.safetensors")


def _all_finite(policy) -> bool:
    bad = 0
    for params in policy.params.values():
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += int(not bool(torch.isfinite(local).all()))
    return int(all_reduce_sum(torch.tensor([bad]))[0]) == 0


def save_checkpoint(save_dir: str | Path, step: int, policy, state: dict, *, is_main: bool = True,
                    keep: int = 0) -> Path:
    """Write checkpoint-<step> atomically (every rank calls this) and return its path; with ``keep`` > 0,
    then delete all but the newest ``keep`` complete checkpoints."""
    if not _all_finite(policy):
        raise RuntimeError(f"refusing to save checkpoint {step}: non-finite weights")
    save_dir = Path(save_dir)
    final = save_dir / f"checkpoint-{step}"
    tmp = save_dir / f".checkpoint-{step}.tmp"
    error = None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        modules = policy.modules()
        model_sd, optim_sd = get_state_dict(modules, policy.optimizer, options=SHARDED)
        sharded = {"model": model_sd, "optim": optim_sd}
        if policy.old is not None:  # DiffusionNFT's old policy
            sharded["old"] = policy.old
        dcp.save(sharded, checkpoint_id=str(tmp / "dcp"))
        gathered = get_model_state_dict(modules, options=GATHERED)  # a collective: every rank joins
        if is_main:
            _write_rank0_files(tmp, final, step, policy, gathered, state)
    except (OSError, RuntimeError, CheckpointException) as exc:  # how torch.save and DCP report a full disk
        error = exc
    # every rank learns whether the write failed, so none waits at a barrier for a rank that gave up
    if int(all_reduce_sum(torch.tensor([int(error is not None)]))[0]):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(save_dir, verify=False)
        kept = f"; {previous.name} is intact" if previous is not None else ""
        reason = _reason(error) if error is not None else "another process failed to write"
        raise UserError(f"cannot write checkpoint {step} in {save_dir} ({reason}); free space or pass a writable "
                        f"--save_dir{kept}") from None
    barrier()
    if is_main and keep > 0:
        for _, old_ckpt in sorted(_numbered(save_dir))[:-keep]:
            shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


def _reason(error: BaseException) -> str:
    """One line for a failed write; DCP wraps the ranks' exceptions in a CheckpointException."""
    if isinstance(error, CheckpointException):  # failures: rank -> (exception, traceback)
        inner = [e[0] if isinstance(e, tuple) else e for e in error.failures.values()]
        inner = [e for e in inner if isinstance(e, BaseException)]
        if inner:
            error = inner[0]
    text = getattr(error, "strerror", None) or str(error)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)


def _write_rank0_files(tmp: Path, final: Path, step: int, policy, gathered: dict, state: dict) -> None:
    """Exported experts, loop state and manifest into ``tmp``, then the rename into place."""
    for idx, expert in policy.experts.items():
        prefix = f"{idx.label}."
        weights = {k[len(prefix):]: v for k, v in gathered.items() if k.startswith(prefix)}
        _export_expert(expert, weights, tmp / idx.diffusers_dir, lora=policy.lora)
    payload = {**state, "step": step, "scheduler": policy.scheduler.state_dict(), "rng": rng_state(),
               "lora": policy.lora, "experts": [int(e) for e in sorted(policy.experts)],
               "old_policy": policy.old is not None}
    torch.save(payload, tmp / STATE_FILE)
    files = [f"{e.diffusers_dir}/" for e in sorted(policy.experts)] + ["dcp/ (sharded weights and optimizer)",
                                                                        STATE_FILE]
    (tmp / "README.md").write_text(model_card(state.get("config", {}), step, files=files))
    _test_pause()
    _write_json(tmp / MANIFEST, manifest(tmp))
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prepare_save_dir(path: str | Path, *, create: bool = True) -> Path:
    """The run folder, created if needed; a file in its place or a folder that cannot be written is a
    one-line error before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--save_dir {path} is a file; pass a folder (new or a run's own)")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--save_dir {path}: cannot create it ({exc.strerror}); pass a writable folder") from None
    probe = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--save_dir {path}: {probe} is not writable; pass a writable folder")
    return path


def _test_pause() -> None:
    delay = float(os.environ.get(SLOW_WRITE_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _write_json(path: Path, data) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under ``folder`` but the manifest itself."""
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def verify_checkpoint(path: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else what is wrong."""
    listed_path = path / MANIFEST
    if not listed_path.is_file():
        return f"no {MANIFEST}"
    try:
        listed = json.loads(listed_path.read_text())
    except (OSError, json.JSONDecodeError):
        return f"unreadable {MANIFEST}"
    for name, entry in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        if _sha256(f) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _numbered(save_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in Path(save_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return found


def latest_checkpoint(save_dir: str | Path, *, verify: bool = True) -> Path | None:
    """The newest complete checkpoint; with ``verify``, damaged ones are skipped with a warning."""
    for _, path in sorted(_numbered(Path(save_dir)), reverse=True):
        if not verify:
            return path
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if problem == f"no {MANIFEST}" and (path / STATE_FILE).is_file():
            log.warning("%s has no %s (written by an older wan-grpo): resuming from it unverified", path, MANIFEST)
            return path
        log.warning("skipping %s: %s; falling back to the previous checkpoint", path, problem)
    return None


def resolve_resume(resume: str | None, save_dir: str | Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(save_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {path} is not a complete checkpoint (no {STATE_FILE}); pass checkpoint-<step> "
                        "or --resume auto")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"--resume {path} is damaged ({problem}); pass an earlier checkpoint or --resume auto")
    return path


def prompts_record(prompts: list[str]) -> dict:
    """What a checkpoint keeps of its prompt list: resuming on another list would not replay the same batches."""
    return {"count": len(prompts), "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


# Keys a resumed run may change silently: where it writes and logs, how often, when it stops (a cosine schedule
# stretches to the new end), and how the work is placed on devices and processes (the last bits of the numbers
# may differ); the training data are compared by content (check_same_prompts).
PLACEMENT_KEYS = frozenset((
    "save_dir", "save_interval", "keep_checkpoints", "log_interval", "resume", "tensorboard", "report_to",
    "wandb_project", "wandb_run_name", "max_steps", "num_epochs", "sample_interval", "eval_interval", "eval_prompts",
    "prompts", "dataset", "captions", "device", "dit_fsdp", "ulysses_size", "offload_model", "gradient_checkpointing",
    "compile", "rollout_batch_size", "decode_batch_size", "train_batch_size", "trajectory_on_cpu", "t5_cpu",
    "t5_fsdp", "vae_slicing", "vae_tiling", "embedding_cache", "attention_backend", "reward_device", "reward_token",
    "reward_timeout", "reward_retries", "reward_batch_size"))


def changed_settings(saved: dict, now: dict, skip=()) -> dict:
    """{key: (saved value, value now)} for the settings outside PLACEMENT_KEYS and ``skip`` that differ (keys one
    side lacks, from another wan-grpo version, are skipped)."""
    keys = saved.keys() & now.keys() - PLACEMENT_KEYS - set(skip)
    return {k: (saved[k], now[k]) for k in sorted(keys) if saved[k] != now[k]}


def _restoring_flags(changed: dict) -> str:
    """The flags that give back the saved values; a saved None has no flag (only a config file's `key: null`)."""
    flags = " ".join(f"--{k} {shlex.quote(str(old))}" for k, (old, _) in changed.items() if old is not None)
    unset = [k for k, (old, _) in changed.items() if old is None]
    return flags + (f"{' and ' if flags else ''}`{': null`, `'.join(unset)}: null` in a --config file" if unset else "")


def check_resumable(path: Path, cfg) -> dict | None:
    """One-line error, before any model loads, when ``cfg`` trains other parameters than ``path`` holds, or
    numbers its steps otherwise; a warning naming every other setting that differs from the checkpoint's (a
    changed default included), since the continued run is then not the one that was saved.
    Returns the checkpoint's prompt-list record (None in checkpoints older than it) for check_same_prompts."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    saved = state.get("config", {})
    if saved and ("algorithm" in saved) != hasattr(cfg, "algorithm"):  # only train's config has an algorithm
        made, other = ("train", "sft") if "algorithm" in saved else ("sft", "train")
        raise UserError(f"{path} is a wan-grpo {made} checkpoint, not {other}'s; resume it with wan-grpo {made} or "
                        "start a new --save_dir")
    checks = [("algorithm", lambda c: c.get("algorithm", "grpo")), ("lora_rank", lambda c: int(c["lora_rank"])),
              ("init_lora", lambda c: c.get("init_lora")), ("init_lora_mode", lambda c: c.get("init_lora_mode")),
              ("train_experts", lambda c: sorted(expert_names(c["train_experts"]))),
              # steps (checkpoint names, the LR schedule, metrics) count optimizer steps, k to a rollout
              ("optimizer_steps_per_rollout", lambda c: c.get("optimizer_steps_per_rollout"))]
    if cfg.lora_rank > 0 and saved.get("lora_rank", 0) > 0:
        checks += [("lora_alpha", lambda c: float(c["lora_alpha"])),
                   ("lora_target_modules", lambda c: lora_targets(c["lora_target_modules"]))]
    for name, norm in checks:
        if name in saved and norm(saved) != norm(vars(cfg)):
            raise UserError(f"--{name} {getattr(cfg, name)!r} differs from {path}'s {saved[name]!r}; resume with "
                            f"--{name} {saved[name]} or start a new --save_dir")
    # the checked keys compare normalised; LoRA's shape is checked above where there is a LoRA, moot where none
    changed = changed_settings(saved, vars(cfg), skip=[*(name for name, _ in checks), "lora_alpha",
                                                       "lora_target_modules"])
    if changed and os.environ.get("RANK", "0") == "0":
        log.warning("resuming %s with settings it was not trained with: %s; to continue it unchanged, pass %s",
                    path, ", ".join(f"{k} {new!r} (it had {old!r})" for k, (old, new) in changed.items()),
                    _restoring_flags(changed))
    return state.get("prompts")


def check_same_prompts(record: dict | None, prompts: list[str], flag: str, path: Path) -> None:
    """One-line error when ``prompts`` (given by ``flag``) is not the list ``path`` was trained on
    (``record``: check_resumable's return)."""
    if record is not None and record != prompts_record(prompts):
        raise UserError(f"{flag} now gives {len(prompts)} prompts, not the {record['count']} (in that order) {path} "
                        f"was trained on; resume with the same {flag} or start a new --save_dir")


def load_sharded(modules, optimizer, to_load: dict, dcp_dir: Path) -> None:
    """Load ``to_load`` (model and optimizer state dicts from get_state_dict, plus anything loaded in place)
    from ``dcp_dir`` and set it into ``modules`` and ``optimizer``.

    A parameter that had no gradient before the save (e.g. an expert --sde_window never reaches) has no
    optimizer state there, and must have none after the resume either, as in the run that was saved:
    get_state_dict gave it a placeholder, which is kept out of the load, marked, and dropped after
    set_state_dict (which, before torch 2.10, needs an entry for every parameter).
    """
    saved = {k.removeprefix("optim.state.").rsplit(".", 1)[0]
             for k in dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
             if k.startswith("optim.state.")}
    states = to_load["optim"]["state"]
    unsaved = {fqn: states.pop(fqn) for fqn in list(states) if fqn not in saved}
    dcp.load(to_load, checkpoint_id=str(dcp_dir))
    for placeholder in unsaved.values():
        if "step" in placeholder:  # AdamW's; the trainers' optimizer
            placeholder["step"] = torch.full_like(torch.as_tensor(placeholder["step"]), -1.0)
    states.update(unsaved)
    set_state_dict(modules, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"],
                   options=SHARDED)
    for param in [p for p, s in optimizer.state.items() if "step" in s and float(s["step"]) == -1.0]:
        del optimizer.state[param]


def load_checkpoint(path: Path, policy) -> dict:
    """Restore trainable weights, optimizer, LR schedule and RNG on any number of processes."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state["lora"] != policy.lora or state["experts"] != sorted(policy.experts):
        raise UserError(f"{path} was saved with other --lora_rank/--train_experts settings; match them to resume")
    modules = policy.modules()
    model_sd, optim_sd = get_state_dict(modules, policy.optimizer, options=SHARDED)
    to_load = {"model": model_sd, "optim": optim_sd}
    if policy.old is not None:
        if not state.get("old_policy"):
            raise UserError(f"{path} holds no old policy (a grpo run); resume it with --algorithm grpo")
        to_load["old"] = policy.old  # loaded in place
    elif state.get("old_policy"):
        raise UserError(f"{path} is an nft run's checkpoint; resume it with --algorithm nft")
    load_sharded(modules, policy.optimizer, to_load, path / "dcp")
    policy.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def check_trained_checkpoint(ckpt: str | Path) -> Path:
    """``--lora``: a checkpoint-<step> folder of a train or sft run, checked before any model loads."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"--lora {ckpt} does not exist; pass a checkpoint-<step> folder of a train run")
    if not (ckpt / STATE_FILE).is_file():
        raise UserError(f"--lora {ckpt} is not a train checkpoint (no {STATE_FILE}); pass checkpoint-<step>")
    return ckpt


def apply_checkpoint(components, ckpt: str | Path) -> list[str]:
    """Load a train or sft checkpoint's exported experts (LoRA or full) into ``components``; returns the
    experts changed."""
    ckpt = check_trained_checkpoint(ckpt)
    changed = []
    for expert in Expert:
        sub = expert.diffusers_dir
        folder = ckpt / sub
        model = components.expert(expert)
        if not folder.is_dir():
            continue
        if model is None:
            raise UserError(f"{folder} exists but this model has no {sub}; evaluate with the checkpoint's model")
        if (folder / LORA_FILE).is_file():
            model.load_lora_adapter(str(folder), weight_name=LORA_FILE, prefix="transformer")
        elif (folder / "config.json").is_file():
            trained = WanTransformer3DModel.from_pretrained(folder, torch_dtype=model.dtype)
            model.load_state_dict(trained.state_dict())
        else:
            raise UserError(f"{folder} holds neither pytorch_lora_weights.safetensors nor a model; pick a train "
                            "checkpoint folder")
        changed.append(sub)
    if not changed:
        raise UserError(f"--lora {ckpt} has no transformer/ or transformer_2/ folder; pass checkpoint-<step>")
    return changed
