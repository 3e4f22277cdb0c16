"""UMT5 prompt embeddings, computed once per distinct prompt and cached.

Tokenisation, cleaning, truncation and zero-padding follow diffusers' WanPipeline exactly, so
a cached embedding is the one the pipeline would have computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors.torch import load_file, save_file

from wan_grpo.errors import UserError

log = logging.getLogger("wan_grpo")

TEXT_LEN = 512  # Wan2.2's text_len; WanPipeline.__call__'s max_sequence_length default


@torch.no_grad()
def _encode(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int):
    """((N, max_sequence_length, text_dim) embeddings zeroed past each prompt's own length, (N,) token counts)."""
    cleaned = [prompt_clean(p) for p in prompts]
    tokens = tokenizer(
        cleaned,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    lengths = mask.gt(0).sum(dim=1)
    keep = torch.arange(max_sequence_length, device=device)[None, :] < lengths[:, None]
    # +0.0 padding, as WanPipeline's new_zeros (a product with 0 gives -0.0 for negative values).
    return hidden.masked_fill(~keep[..., None], 0.0), lengths


class PromptEmbeddingCache:
    """Prompt -> embedding (1, L, D), on ``device`` in ``dtype``; encodes each text at most once."""

    def __init__(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int = TEXT_LEN):
        self.device, self.dtype, self.max_sequence_length = torch.device(device), dtype, max_sequence_length
        self._cache: dict[str, torch.Tensor] = {}

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def add(self, prompts: list[str], tokenizer, text_encoder, *, batch_size: int = 8,
            disk: EmbeddingDiskCache | None = None) -> None:
        """Encode the prompts not cached yet; with ``disk``, also write each new embedding there."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing and text_encoder is None:
            raise RuntimeError("the text encoder was already freed; add every prompt before dropping it")
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            embeds, lengths = _encode(tokenizer, text_encoder, chunk, self.max_sequence_length)
            for prompt, e, n in zip(chunk, embeds, lengths.tolist()):
                self._cache[prompt] = e[None].to(self.device, self.dtype)
                if disk is not None:
                    disk.save(prompt, e[:n])

    def add_from_disk(self, prompts: list[str], disk: EmbeddingDiskCache) -> list[str]:
        """Take what ``disk`` holds; returns the distinct prompts still missing."""
        missing = []
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            e = disk.load(prompt)
            if e is None:
                missing.append(prompt)
            else:
                self._cache[prompt] = e[None].to(self.device, self.dtype)
        return missing

    def get(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, D) for a list of already-added prompts."""
        try:
            return torch.cat([self._cache[p] for p in prompts])
        except KeyError as exc:
            raise KeyError(f"prompt not encoded: {exc.args[0]!r}") from None


class EmbeddingDiskCache:
    """--embedding_cache: one safetensors file per prompt, named by sha256(model identity, text length, prompt).

    A file holds the embedding's first ``n`` rows (the prompt's tokens, in the encoder's dtype); the
    zero rows past them are added back on load, so an entry equals the fresh embedding bit for bit.
    """

    def __init__(self, folder: str | Path, identity: str, *, max_sequence_length: int = TEXT_LEN):
        self.folder, self.identity, self.max_sequence_length = Path(folder), identity, max_sequence_length

    def path(self, prompt: str) -> Path:
        key = json.dumps([self.identity, self.max_sequence_length, prompt], ensure_ascii=False)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def load(self, prompt: str) -> torch.Tensor | None:
        """(max_sequence_length, D) on CPU, or None when not cached (or unreadable)."""
        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            e = load_file(path)["embedding"]
        except Exception as exc:  # a damaged entry is recomputed (and rewritten) rather than fatal
            log.warning("ignoring unreadable embedding cache entry %s (%s)", path, exc)
            return None
        # 0 rows is valid: a tokenizer that adds no end token gives an empty prompt no tokens at all
        if e.ndim != 2 or not 0 <= e.shape[0] <= self.max_sequence_length:
            log.warning("ignoring embedding cache entry %s of shape %s", path, tuple(e.shape))
            return None
        return torch.cat([e, e.new_zeros(self.max_sequence_length - e.shape[0], e.shape[1])])

    def save(self, prompt: str, embedding: torch.Tensor) -> None:
        """Write atomically, so concurrent ranks and interrupted runs never leave a partial file."""
        path = self.path(prompt)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({"embedding": embedding.detach().cpu().contiguous()}, str(tmp), metadata={"prompt": prompt})
            os.replace(tmp, path)
        except OSError as exc:
            raise UserError(f"--embedding_cache {self.folder}: cannot write ({exc}); pass a writable folder") from exc


def files_identity(paths: list[Path], *, blocks: int = 64, block_size: int = 1 << 16) -> str:
    """sha256 over the files under ``paths``: small files whole, big ones by size and ``blocks`` evenly spaced blocks.

    Reads ~4 MiB per weight file, not the 11 GB; unlike paths or mtimes it is the same for every copy
    of a model, and retrained weights change the blocks (every ~80 MB of a 5 GB shard is sampled, less
    than one UMT5-XXL weight matrix). Hidden entries (e.g. huggingface's download cache) are skipped.
    """
    h = hashlib.sha256()
    for base in paths:
        files = sorted(base.rglob("*")) if base.is_dir() else [base]
        for f in files:
            rel = f.relative_to(base.parent)
            if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            size = f.stat().st_size
            h.update(f"{rel.as_posix()}\0{size}\0".encode())
            with f.open("rb") as fh:
                if size <= blocks * block_size:
                    h.update(fh.read())
                    continue
                for i in range(blocks):
                    fh.seek((size - block_size) * i // (blocks - 1))
                    h.update(fh.read(block_size))
    return h.hexdigest()


def module_identity(text_encoder, tokenizer) -> str:
    """sha256 of an in-memory encoder's weights and tokenizer (the built-in tiny model)."""
    h = hashlib.sha256()
    for name, t in text_encoder.state_dict().items():
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    return h.hexdigest()
