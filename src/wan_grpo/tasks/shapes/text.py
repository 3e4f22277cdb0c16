"""The Shapes text encoder: a word-level tokenizer over the grammar's words and a small UMT5.

The encoder starts from seeded random weights and is taught the grammar once by the build
(``pretrain_text_encoder``: every output token must carry the whole parse), then frozen: SFT and RL
train only the experts, whose text projections learn to read it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from wan_grpo.tasks.shapes.world import COLOURS, DIRECTIONS, RELATIONS, SHAPES, parse

TEXT_DIM = 32
TEXT_LEN = 16  # tokens per prompt embedding (the longest prompt has 10); Wan's 512 would be mostly padding
SPECIAL = ("<pad>", "</s>", "<unk>")


def vocabulary() -> list[str]:
    words = ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS]
    words += [w for r in RELATIONS for w in r.split()]
    return [*SPECIAL, *dict.fromkeys(words)]


def shapes_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased whitespace words; unknown words map to <unk>; </s> appended like T5."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LEN)


def shapes_text_encoder(seed: int) -> UMT5EncoderModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(UMT5Config(
            vocab_size=len(vocabulary()), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )).eval()


def scene_targets(prompt: str) -> list[int]:
    """Class indices of a prompt's attributes: colour and shape of each object (0 = no second object),
    direction and relation (0 = none)."""

    scene = parse(prompt)
    colours, shapes = list(COLOURS), list(SHAPES)
    a = scene.objects[0]
    b = scene.objects[1] if len(scene.objects) > 1 else None
    return [colours.index(a.colour), shapes.index(a.shape), 0 if b is None else 1 + colours.index(b.colour),
            0 if b is None else 1 + shapes.index(b.shape),
            0 if scene.direction is None else 1 + list(DIRECTIONS).index(scene.direction),
            0 if scene.relation is None else 1 + list(RELATIONS).index(scene.relation)]


ATTRIBUTE_CLASSES = (len(COLOURS), len(SHAPES), len(COLOURS) + 1, len(SHAPES) + 1, len(DIRECTIONS) + 1,
                     len(RELATIONS) + 1)


def pretrain_text_encoder(encoder: UMT5EncoderModel, tokenizer, prompts: list[str], *, steps: int = 300,
                          seed: int = 0, lr: float = 3e-3) -> list[float]:
    """Teach the encoder the grammar, as a real text encoder knows its language: from every output token
    (padding included), linear heads must read every attribute of the scene, so each token carries the
    whole parse (which colour goes with which shape, and which object comes first). Training prompts only.
    Returns the losses; the heads are discarded."""
    targets = torch.tensor([scene_targets(p) for p in prompts])  # (N, 6)
    tokens = tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = torch.nn.ModuleList(torch.nn.Linear(TEXT_DIM, n) for n in ATTRIBUTE_CLASSES)
        opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=lr)
        encoder.train()
        for _ in range(steps):
            hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
            loss = sum(torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1),
                                                         targets[:, k].repeat_interleave(TEXT_LEN))
                       for k, head in enumerate(heads)) / len(heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    encoder.eval().requires_grad_(False)
    return losses
