"""Memory features: --embedding_cache, --t5_cpu, --vae_tiling / --vae_slicing, gradient checkpointing default."""

import contextlib
import shutil

import pytest
import torch

from wan_grpo.config import SampleConfig
from wan_grpo.grpo.config import TrainConfig
from wan_grpo.grpo.policy import build_policy, use_gradient_checkpointing
from wan_grpo.models.text import EmbeddingDiskCache, files_identity, module_identity
from wan_grpo.models.tiny import build_tiny_components
from wan_grpo.models.vae import decode_latents, latent_stats, to_frames
from wan_grpo.runtime import encode_all, load_model, text_encoder_device
from wan_grpo.sft.config import SFTConfig

PROMPTS = ["A cat walking in snow", "  a   dog, running  ", "一只猫在雪地里行走", "A cat walking in snow"]
NEG = ""
CPU = torch.device("cpu")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # fp32 -> raw bits: equal here means bit-identical (signs of 0 too)


def fresh_embeddings(prompts, **cfg):
    components, _, _, _ = load_model(SampleConfig(device="cpu", **cfg))
    cache = encode_all(components, prompts, NEG, device=CPU, dtype=torch.float32)
    return cache.get(list(prompts) + [NEG])


def forbid_encoder(components):
    """Make any move or forward of the text encoder fail the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the text encoder was used although every prompt was cached")
    components.text_encoder.to = fail
    components.text_encoder.forward = fail


def test_embedding_cache_is_bit_identical_and_a_full_hit_never_touches_the_encoder(tmp_path):
    folder = tmp_path / "emb"
    reference = fresh_embeddings(PROMPTS)

    first = fresh_embeddings(PROMPTS, embedding_cache=str(folder))
    assert torch.equal(bits(first), bits(reference))
    assert len(list(folder.glob("*.safetensors"))) == 4  # 3 distinct prompts + the negative prompt
    assert not list(folder.glob(".*.tmp"))

    components, _, _, _ = load_model(SampleConfig(device="cpu", embedding_cache=str(folder)))
    forbid_encoder(components)
    cache = encode_all(components, PROMPTS, NEG, device=CPU, dtype=torch.float32)
    assert components.text_encoder is None  # freed all the same
    assert torch.equal(bits(cache.get(PROMPTS + [NEG])), bits(reference))

    # One new prompt: only it is encoded (a batch of one), and written next to the others.
    components, _, _, _ = load_model(SampleConfig(device="cpu", embedding_cache=str(folder)))
    batches = []
    components.text_encoder.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    cache = encode_all(components, PROMPTS + ["a new prompt"], NEG, device=CPU, dtype=torch.float32)
    assert batches == [1]
    assert len(list(folder.glob("*.safetensors"))) == 5
    assert torch.equal(bits(cache.get(["a new prompt"])), bits(fresh_embeddings(["a new prompt"])[:1]))


def test_embedding_cache_key_depends_on_model_length_and_exact_text(tmp_path):
    a = EmbeddingDiskCache(tmp_path, "model-a")
    assert a.path("a cat") == EmbeddingDiskCache(tmp_path, "model-a").path("a cat")
    assert a.path("a cat") != EmbeddingDiskCache(tmp_path, "model-b").path("a cat")
    assert a.path("a cat") != EmbeddingDiskCache(tmp_path, "model-a", max_sequence_length=256).path("a cat")
    assert a.path("a cat") != a.path("a cat ")  # exact text, even where cleaning would make them equal

    # The tiny model's identity is stable across loads and changes with any weight.
    def setup():
        return load_model(SampleConfig(device="cpu", embedding_cache=str(tmp_path)))[0].text_setup

    first = setup()
    assert first.identity == setup().identity
    components = build_tiny_components(0)
    assert module_identity(components.text_encoder, components.tokenizer) == first.identity.split(":", 1)[1]
    with torch.no_grad():
        components.text_encoder.shared.weight[0, 0] += 1
    assert module_identity(components.text_encoder, components.tokenizer) != first.identity.split(":", 1)[1]
    assert first.load is None and not first.t5_cpu


def test_files_identity_is_path_independent_and_sees_changed_weights(tmp_path):
    src = tmp_path / "a" / "text_encoder"
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"d_model": 32}')
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 64)  # 16 KiB: "big" for 4 blocks of 64 bytes
    (src / ".cache").mkdir()
    (src / ".cache" / "download.metadata").write_text("changes every download")
    copy = tmp_path / "b" / "text_encoder"
    shutil.copytree(src, copy)
    (copy / ".cache" / "download.metadata").write_text("something else")
    ident = files_identity([src], blocks=4, block_size=64)
    assert files_identity([copy], blocks=4, block_size=64) == ident
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[(len(weights) - 64) // 3 + 10] ^= 1  # inside the second of 4 sampled blocks
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert files_identity([copy], blocks=4, block_size=64) != ident
    unsampled = bytearray(weights)
    unsampled[(len(weights) - 64) // 3 + 10] ^= 1
    unsampled[100] ^= 1  # between the first and second block: by design not seen
    (copy / "model.safetensors").write_bytes(bytes(unsampled))
    assert files_identity([copy], blocks=4, block_size=64) == ident
    assert files_identity([src]) != ident  # small enough to hash whole: another digest


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory):
    from test_original_layout import build_a14b, save_both

    base = tmp_path_factory.mktemp("orig-layout")
    save_both(build_a14b(), base / "diffusers", base / "original", "t2v")
    return base / "original"


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_embedding_cache_loads_the_text_encoder_of_a_checkpoint_only_on_a_miss(layout, request, tmp_path):
    ckpt = request.getfixturevalue("tiny_ckpt" if layout == "diffusers" else "original_ckpt")
    folder = str(tmp_path / "emb")
    eager, _, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt), device="cpu"))
    reference = encode_all(eager, PROMPTS, NEG, device=CPU, dtype=torch.float32).get(PROMPTS + [NEG])

    components, _, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt), device="cpu", embedding_cache=folder))
    assert components.text_encoder is None and components.text_setup.load is not None
    loads = []
    real_load = components.text_setup.load
    components.text_setup.load = lambda: loads.append(1) or real_load()
    cache = encode_all(components, PROMPTS, NEG, device=CPU, dtype=torch.float32)
    assert loads == [1] and components.text_encoder is None
    assert torch.equal(bits(cache.get(PROMPTS + [NEG])), bits(reference))

    components, _, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt), device="cpu", embedding_cache=folder))

    def no_load():
        raise AssertionError("loaded the text encoder although every prompt was cached")
    components.text_setup.load = no_load
    cache = encode_all(components, PROMPTS, NEG, device=CPU, dtype=torch.float32)
    assert torch.equal(bits(cache.get(PROMPTS + [NEG])), bits(reference))


def test_checkpoint_identity_depends_on_the_encoder_dtype_and_files(tiny_ckpt, original_ckpt, tmp_path):
    def identity(ckpt, dtype):
        cfg = SampleConfig(ckpt_dir=str(ckpt), device="cpu", dtype=dtype, embedding_cache=str(tmp_path))
        return load_model(cfg, load_text_encoder=False)[0].text_setup.identity

    assert identity(tiny_ckpt, "fp32") == identity(tiny_ckpt, "fp32")
    assert identity(tiny_ckpt, "fp32") != identity(tiny_ckpt, "bf16")
    assert identity(tiny_ckpt, "fp32") != identity(original_ckpt, "fp32")


def test_t5_cpu_keeps_the_encoder_on_cpu_and_moves_embeddings_to_the_device():
    assert text_encoder_device(torch.device("cuda"), True) == CPU
    assert text_encoder_device(torch.device("cuda"), False) == torch.device("cuda")
    assert torch.equal(bits(fresh_embeddings(PROMPTS, t5_cpu=True)), bits(fresh_embeddings(PROMPTS)))

    # A device the encoder cannot run on (meta): with --t5_cpu it is only ever sent to CPU, and the
    # embeddings land on the device.
    for t5_cpu in (True, False):
        components, _, _, _ = load_model(SampleConfig(device="cpu", t5_cpu=t5_cpu))
        encoder, moves = components.text_encoder, []
        real_to = encoder.to
        encoder.to = lambda *a, **k: moves.append(torch.device(a[0])) or real_to(*a, **k)  # noqa: B023 (used now)
        with contextlib.suppress(RuntimeError) if not t5_cpu else contextlib.nullcontext():
            cache = encode_all(components, PROMPTS, NEG, device=torch.device("meta"), dtype=torch.float32)
        if t5_cpu:
            assert moves == [CPU] and next(encoder.parameters()).device == CPU
            assert cache.get(PROMPTS).device.type == "meta"
        else:
            assert moves == [torch.device("meta")]  # what the check above would catch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_t5_cpu_on_cuda():
    components, _, _, _ = load_model(SampleConfig(device="cuda", t5_cpu=True))
    encoder = components.text_encoder
    cache = encode_all(components, PROMPTS, NEG, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert next(encoder.parameters()).device == CPU
    got = cache.get(PROMPTS)
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert torch.equal(got.cpu(), fresh_embeddings(PROMPTS)[: len(PROMPTS)].to(torch.bfloat16))


def test_vae_flags_enable_tiling_and_slicing():
    plain = load_model(SampleConfig(device="cpu"))[0].vae
    assert not plain.use_tiling and not plain.use_slicing
    vae = load_model(SampleConfig(device="cpu", vae_tiling=True, vae_slicing=True))[0].vae
    assert vae.use_tiling and vae.use_slicing
    assert (vae.tile_sample_min_height, vae.tile_sample_stride_height) == (256, 192)  # diffusers' defaults


def test_vae_tiled_and_sliced_decode_match_plain_decode():
    vae = build_tiny_components(0).vae
    latents = torch.randn(2, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))  # 64x64 px, 5 frames
    plain = decode_latents(vae, latents, micro_batch=2)

    vae.enable_slicing()
    sliced = decode_latents(vae, latents, micro_batch=2)
    vae.disable_slicing()
    # Batch-of-2 vs one-at-a-time convolutions round differently: measured max 1 uint8 level.
    assert (sliced.int() - plain.int()).abs().max() <= 1

    one = decode_latents(vae, latents[:1])
    # Default tiles (256 px) exceed this video: no tiling, so the decode is the plain one.
    vae.enable_tiling()
    assert torch.equal(decode_latents(vae, latents[:1]), one)
    # 48 px tiles at a 32 px stride: 2x2 tiles per 64x64 frame, blended over 16 px.
    tiles = []
    real_tiled = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: tiles.append(1) or real_tiled(*a, **k)
    vae.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=48, tile_sample_stride_height=32,
                      tile_sample_stride_width=32)
    tiled = decode_latents(vae, latents[:1])
    assert tiles == [1] and tiled.shape == one.shape and tiled.dtype == torch.uint8
    # Where no tile is blended in (the top-left 32x32), a tile is the plain decode of its 6x6 latents.
    vae.disable_tiling()
    corner = decode_latents(vae, latents[:1, :, :, :6, :6])
    assert torch.equal(tiled[:, :, :32, :32], corner[:, :, :32, :32])
    # Elsewhere tiles see less context than the whole frame, and the random tiny VAE (mid-block
    # attention over the frame, 10x output layer, many pixels clipped) is not local: measured mean
    # |tiled - plain| 8.1 uint8 levels, against 20.5 for the decode of an unrelated latent. This checks
    # the code path, not how close tiling gets with trained weights.
    other = decode_latents(vae, torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1)))
    diff, unrelated = ((x.float() - one.float()).abs().mean() for x in (tiled, other))
    assert 0 < diff < 10 and diff < unrelated / 2


def test_gradient_checkpointing_defaults_on_for_real_checkpoints_only():
    assert use_gradient_checkpointing(TrainConfig(task="tiny")) is False
    assert use_gradient_checkpointing(TrainConfig(task="shapes")) is False
    assert use_gradient_checkpointing(SFTConfig(task="shapes")) is False
    assert use_gradient_checkpointing(TrainConfig(task="t2v-A14B")) is True
    assert use_gradient_checkpointing(TrainConfig(task="tiny", gradient_checkpointing=True)) is True
    assert use_gradient_checkpointing(TrainConfig(task="t2v-A14B", gradient_checkpointing=False)) is False
    for task, expected in (("tiny", False), ("t2v-A14B", True)):
        components = build_tiny_components(0)
        policy = build_policy(components, TrainConfig(task=task, lora_rank=4), device=CPU)
        assert [e.is_gradient_checkpointing for e in policy.experts.values()] == [expected, expected]


def test_gradient_checkpointing_flag_parses_to_none_true_false():
    import argparse

    from wan_grpo.config import add_config_arguments, build_config

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    for argv, expected in (([], None), (["--gradient_checkpointing"], True),
                           (["--gradient_checkpointing", "false"], False)):
        assert build_config(TrainConfig, parser.parse_args(argv)).gradient_checkpointing is expected


def test_batched_decode_of_a_video_does_not_depend_on_its_batch_mates():
    """decode_latents pads a short last batch, so every call has the same shape and each video's
    pixels are the same whatever videos share its call (or how many processes split the rollout)."""
    vae = build_tiny_components(0).vae
    latents = torch.randn(5, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = decode_latents(vae, latents, micro_batch=4)  # calls of [0, 1, 2, 3] and [4 + 3 pads]
    assert ref.shape == (5, 5, 64, 64, 3)
    order = torch.tensor([4, 2, 0, 3, 1])
    assert torch.equal(decode_latents(vae, latents[order], micro_batch=4), ref[order])
    assert torch.equal(decode_latents(vae, latents[3:4], micro_batch=4), ref[3:4])  # a rank holding one video


def test_channels_last_decode_matches_the_channels_first_one_and_restores_the_weights(tmp_path):
    """decode_latents runs the decoder's convolutions channels-last on CPU. On the shipped Shapes VAE its
    pixels are those of diffusers' own (channels-first) decode to one uint8 level, and rarely differ at all
    (measured: 139 of 7.1M values for 64 random latents); afterwards, even after an error inside the block,
    the weights are the very tensors they were, so the VAE still saves as safetensors."""
    from diffusers import AutoencoderKLWan

    from wan_grpo.models.vae import channels_last_convs
    from wan_grpo.tasks.shapes import BASE_DIR

    vae = AutoencoderKLWan.from_pretrained(str(BASE_DIR / "vae")).eval()
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    before = [c.weight for c in convs]
    data = [c.weight.data for c in convs]
    latents = torch.randn(8, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # diffusers' decode, channels-first throughout, with decode_latents' normalisation and rounding
    mean, std = latent_stats(vae)
    with torch.no_grad():
        ref = to_frames(vae.decode(latents * std + mean, return_dict=False)[0])
    layouts = []
    hook = vae.decoder.conv_out.register_forward_pre_hook(
        lambda conv, args: layouts.append(conv.weight.is_contiguous(memory_format=torch.channels_last_3d)))
    fast = decode_latents(vae, latents, micro_batch=4)
    hook.remove()
    assert layouts and all(layouts)  # every decode call ran channels-last
    differ = (fast.int() - ref.int()).abs()
    assert differ.max() <= 1 and differ.float().mean() < 1e-3
    assert all(c.weight is w and c.weight.data.data_ptr() == d.data_ptr() for c, w, d in zip(convs, before, data))
    assert all(c.weight.is_contiguous() for c in convs)
    with pytest.raises(RuntimeError, match="inside"), channels_last_convs(vae.decoder):
        assert not vae.decoder.conv_out.weight.is_contiguous()
        raise RuntimeError("inside")
    assert all(c.weight.is_contiguous() and c.weight.data.data_ptr() == d.data_ptr() for c, d in zip(convs, data))
    vae.save_pretrained(str(tmp_path / "vae"))  # safetensors refuses a channels-last weight
