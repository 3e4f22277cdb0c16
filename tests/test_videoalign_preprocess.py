"""VideoAlign preprocessing on its own, against values computed by hand and transformers' processor."""

import numpy as np
import pytest
import torch

from wan_grpo.rewards.videoalign.preprocess import (
    num_sampled_frames,
    patchify,
    preprocess_video,
    resize_frames,
    sample_indices,
    smart_resize,
)


@pytest.mark.parametrize("total,fps,expected", [
    (40, 16, 4),     # 40/16*2 = 5.0 -> round half to even -> 4 (qwen-vl-utils' rounding)
    (44, 16, 6),     # 5.5 -> 6
    (81, 16, 10),    # Wan2.2 A14B: 10.125 -> 10
    (121, 24, 10),   # TI2V-5B: 10.08 -> 10
    (17, 16, 4),     # 2.1 clamped up to the minimum 4
    (5, 8, 4),       # minimum 4, total 5 -> at most floor(5 / 2) * 2 = 4
    (3000, 1, 768),  # 6000 clamped to 768
])
def test_frame_counts(total, fps, expected):
    assert num_sampled_frames(total, fps) == expected


def test_frame_indices_are_evenly_spaced_and_rounded():
    # linspace(0, 80, 10) = 0, 8.89, 17.78, 26.67, 35.56, 44.44, 53.33, 62.22, 71.11, 80
    assert sample_indices(81, 16).tolist() == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert sample_indices(40, 16).tolist() == [0, 13, 26, 39]


@pytest.mark.parametrize("hw,expected", [
    ((480, 832), (336, 588)),  # over max: beta = sqrt(399360 / 200704) = 1.41060; floor(12.15)=12, floor(21.07)=21
    ((64, 64), (336, 336)),    # under min: beta = sqrt(100352 / 4096) = 4.9497; ceil(11.31) = 12
    ((336, 588), (336, 588)),  # already valid: unchanged
    ((300, 400), (308, 392)),  # round(10.71)=11 -> 308, round(14.29)=14 -> 392; 120736 pixels within range
])
def test_smart_resize(hw, expected):
    h, w = smart_resize(*hw)
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and 100352 <= h * w <= 200704


def test_resize_rounds_to_uint8_and_skips_same_size():
    frames = torch.full((2, 50, 70, 3), 77, dtype=torch.uint8)
    out = resize_frames(frames, (56, 84))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 56, 84) and (out == 77).all()
    noisy = torch.randint(0, 256, (2, 56, 84, 3), dtype=torch.uint8)
    assert torch.equal(resize_frames(noisy, (56, 84)), noisy.permute(0, 3, 1, 2))


def test_patchify_matches_transformers_qwen2vl_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt", do_resize=False)
    # an image is a 2-frame static video to the processor (temporal patch 2)
    frames = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    values, grid = patchify(frames)
    assert grid.tolist() == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    torch.testing.assert_close(values, ref["pixel_values"].float(), rtol=1e-5, atol=1e-5)


def test_preprocess_video_end_to_end_shapes():
    video = torch.randint(0, 256, (81, 480, 832, 3), dtype=torch.uint8)
    values, grid = preprocess_video(video, 16)
    assert grid.tolist() == [5, 24, 42]  # 10 frames / 2; 336 / 14; 588 / 14
    assert values.shape == (5 * 24 * 42, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_video(video.float(), 16)
