"""Strict state-dict loading shared by the DiT, T5 and VAE loaders: every missing, unexpected or
mis-shaped tensor is a one-line UserError; modules are built on the meta device and assigned."""

from __future__ import annotations

from pathlib import Path

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.files import keeps_fp32


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None, keep: list[str]) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    target = torch.float32 if keeps_fp32(name, keep) else dtype
    return tensor if tensor.dtype == target else tensor.to(target)


def first(items, n: int = 5) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_keys(
    source: Path,
    what: str,
    expected: dict[str, torch.Size],
    found: dict[str, tuple[str, tuple]],
    *,
    optional: tuple[str, ...] = (),
) -> None:
    """Strict key/shape check. ``found`` maps target name -> (name in the file, shape)."""
    unexpected = [orig for k, (orig, _) in found.items() if k not in expected]
    missing = [k for k in expected if k not in found and k not in optional]
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {first(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s) (diffusers names): {first(missing)}")
        raise UserError(
            f"{source} does not match the {what} it should hold: {'; '.join(parts)}; "
            "re-download the file, or check that it belongs to this Wan2.2 checkpoint"
        )
    bad = [
        f"{orig} {list(shape)} (expected {list(expected[k])})"
        for k, (orig, shape) in found.items()
        if tuple(shape) != tuple(expected[k])
    ]
    if bad:
        raise UserError(
            f"{source}: {len(bad)} tensor(s) have the wrong shape for the {what} built from its config: "
            f"{first(bad, 3)}; re-download the file or fix config.json"
        )


def rename_unique(names, rename, source: Path, what: str) -> dict[str, str]:
    """{target name: original name}; an original name with no target is reported as unexpected."""
    out: dict[str, str] = {}
    unknown = []
    for k in names:
        new = rename(k)
        if new is None:
            unknown.append(k)
        elif new in out:
            raise UserError(f"{source}: {out[new]} and {k} both map to {new}; the file is not a Wan2.2 {what}")
        else:
            out[new] = k
    if unknown:
        raise UserError(
            f"{source} does not match the {what} it should hold: {len(unknown)} unexpected key(s): "
            f"{first(unknown)}; re-download the file, or check that it belongs to this Wan2.2 checkpoint"
        )
    return out


def torch_load(path: Path) -> dict:
    """A .pth state dict, memory-mapped when the file format allows it (never unpickles code)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read/unpickle failure is a bad file for the user
        raise UserError(f"cannot read {path}: {exc}; re-download that file") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a plain state dict of tensors; re-download that file")
    return sd


def empty(cls_or_fn, *args, **kwargs):
    """Build a module with parameters on the meta device (buffers stay real: rope tables etc.)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls_or_fn(*args, **kwargs)


def assign(model: torch.nn.Module, state_dict: dict, *, what: str, source: Path) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.unexpected_keys:  # _check_keys ran first; this guards against a logic slip
        raise UserError(f"{source}: unexpected key(s) for the {what}: {first(result.unexpected_keys)}")


def no_meta_left(model: torch.nn.Module, source: Path, what: str) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise UserError(f"{source}: the {what} was not fully loaded; missing {first(left)}; re-download it")
