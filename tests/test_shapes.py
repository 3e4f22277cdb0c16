"""The Shapes world: renderer, grammar, splits and the verifier reward."""

import dataclasses

import numpy as np
import pytest
import torch

from wan_grpo.errors import UserError
from wan_grpo.tasks.shapes import splits
from wan_grpo.tasks.shapes.verifier import ShapesReward, score_video
from wan_grpo.tasks.shapes.world import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    FRAMES,
    RELATIONS,
    SHAPES,
    SIZE,
    Obj,
    all_scenes,
    parse,
    render,
)


def test_renderer_draws_what_the_prompt_says_deterministically():
    scene = parse("a yellow triangle moving down")
    video = render(scene, 7)
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == np.uint8
    assert np.array_equal(video, render(scene, 7)) and not np.array_equal(video, render(scene, 8))
    colours = {tuple(c) for c in video.reshape(-1, 3)}
    assert colours == {BACKGROUND, COLOURS["yellow"]}
    ys = [np.argwhere((f == COLOURS["yellow"]).all(-1))[:, 0].mean() for f in video]
    assert ys[-1] - ys[0] >= 16 and all(b >= a for a, b in zip(ys, ys[1:]))  # moves down >= 16 px
    rows, cols = np.nonzero((video[0] == COLOURS["yellow"]).all(-1))
    assert 12 <= rows.max() - rows.min() + 1 <= 20 and 12 <= cols.max() - cols.min() + 1 <= 20


def test_level_two_relation_holds_in_every_frame():
    video = render(parse("a blue circle left of a red square"), 3)
    for frame in video:
        blue = np.argwhere((frame == COLOURS["blue"]).all(-1)).mean(0)
        red = np.argwhere((frame == COLOURS["red"]).all(-1)).mean(0)
        assert red[1] - blue[1] >= 20 and abs(red[0] - blue[0]) <= 7
    assert np.array_equal(video[0], video[-1])  # still objects


def test_grammar_counts_and_round_trip():
    assert len(all_scenes(1)) == 72 and len(all_scenes(2)) == 1080
    for scene in all_scenes(1)[:5] + all_scenes(2)[::97]:
        assert parse(scene.prompt()) == scene
    assert parse("  A Red   Circle moving LEFT ") == parse("a red circle moving left")


@pytest.mark.parametrize("bad", ["a red circle", "a pink circle moving left", "a red circle above a red square",
                                 "two red circles", "a red circle moving diagonally"])
def test_prompts_outside_the_grammar_are_one_line_errors(bad):
    with pytest.raises(UserError) as err:
        parse(bad)
    message = str(err.value)
    assert "\n" not in message and "is not a Shapes prompt" in message and "COLOUR SHAPE moving DIRECTION" in message


def test_shipped_splits_are_the_generated_ones_and_cover_every_attribute():
    for level in (1, 2):
        made = splits.make_splits(level)
        sizes = {k: len(v) for k, v in made.items()}
        total = len(all_scenes(level))
        assert sum(sizes.values()) == total
        assert abs(sizes["train"] / total - 0.7) < 0.02 and abs(sizes["heldout"] / total - 0.2) < 0.02
        for name in splits.SPLITS:
            assert splits.load_split(level, name) == made[name]
        assert not set(made["train"]) & (set(made["val"]) | set(made["heldout"]))
        assert not set(made["val"]) & set(made["heldout"])
        words = " ".join(made["train"])
        for value in (*COLOURS, *SHAPES, *(DIRECTIONS if level == 1 else RELATIONS)):
            assert value in words


def test_shapes_train_prompts_balance_the_levels_and_evaluation_lists_do_not():
    from wan_grpo.grpo.data import load_prompt_records

    level1, level2 = splits.load_split(1, "train"), splits.load_split(2, "train")
    prompts, images = load_prompt_records("shapes:train", training=True)
    assert prompts[:15] == [level1[0]] * 15 and prompts[-len(level2):] == level2
    assert len(prompts) == 15 * len(level1) + len(level2) and images == [None] * len(prompts)
    assert load_prompt_records("shapes:train")[0] == level1 + level2  # eval: each prompt once
    assert load_prompt_records("shapes:1:train")[0] == level1
    assert load_prompt_records("shapes:heldout")[0] == splits.load_split(1, "heldout") + splits.load_split(2, "heldout")


def _sample_scenes(level, n, seed=0):
    scenes = all_scenes(level)
    return [scenes[i] for i in np.random.default_rng(seed).choice(len(scenes), n, replace=False)]


def test_verifier_accepts_the_renderers_own_videos():
    accuracies = []
    for level, n in ((1, 72), (2, 120)):
        for i, scene in enumerate(_sample_scenes(level, n)):
            accuracies.append(score_video(render(scene, 1000 + i), scene)["accuracy"])
    assert np.mean(accuracies) >= 0.98  # measured 1.0


def test_changing_one_attribute_of_the_caption_zeroes_that_component():
    worst = {"colour": 0.0, "shape": 0.0, "motion": 0.0, "relation": 0.0}
    for level in (1, 2):
        for i, scene in enumerate(_sample_scenes(level, 24, seed=level)):
            video = render(scene, i)
            objs = list(scene.objects)
            variants = []
            for k, o in enumerate(objs):
                used = {p.colour for p in objs}
                variants += [("colour", objs[:k] + [Obj(c, o.shape)] + objs[k + 1:]) for c in COLOURS if c not in used]
                variants += [("shape", objs[:k] + [Obj(o.colour, s)] + objs[k + 1:]) for s in SHAPES if s != o.shape]
            for component, new in variants:
                changed = score_video(video, dataclasses.replace(scene, objects=tuple(new)))
                worst[component] = max(worst[component], changed[component])
            if level == 1:
                for d in DIRECTIONS:
                    if d != scene.direction:
                        changed = score_video(video, dataclasses.replace(scene, direction=d))
                        worst["motion"] = max(worst["motion"], changed["motion"])
            else:
                for r in RELATIONS:
                    if r != scene.relation:
                        changed = score_video(video, dataclasses.replace(scene, relation=r))
                        worst["relation"] = max(worst["relation"], changed["relation"])
    assert all(v <= 0.05 for v in worst.values()), worst  # measured 0 each


def test_reward_components_and_coefficients():
    reward = ShapesReward()
    prompts = ["a red circle moving left", "a green square above a blue triangle"]
    videos = [torch.from_numpy(render(parse(p), 0)) for p in prompts]
    out = reward(videos, prompts, fps=8)
    assert set(out) == {"colour", "shape", "fill", "fill_peak", "motion", "relation", "partial", "accuracy", "clean"}
    assert out["accuracy"].tolist() == [1.0, 1.0] and out["partial"].tolist() == [1.0, 1.0]
    assert out["motion"][0] == 1 and torch.isnan(out["motion"][1])  # motion does not apply to level 2
    assert torch.isnan(out["relation"][0]) and out["relation"][1] == 1
    assert reward.coefs["accuracy"] == 1 and all(v == 0 for k, v in reward.coefs.items() if k != "accuracy")
    blank = torch.full_like(videos[0], 30)
    assert reward([blank], prompts[:1], fps=8)["accuracy"].item() == 0
    with pytest.raises(UserError):
        reward(videos[:1], ["a cat walking in snow"], fps=8)


def test_partial_credit_counts_each_attribute_and_shapes_coefs_weighs_it():
    from types import SimpleNamespace

    from wan_grpo.grpo.advantages import group_advantages
    from wan_grpo.rewards import build_rewards

    # a level-1 render scored against captions wrong in 0, 1 or 2 of colour, shape, motion
    video = render(parse("a red circle moving left"), 0)
    partial = [score_video(video, parse(p))["partial"] for p in
               ("a red circle moving left", "a red circle moving right", "a red square moving right",
                "a blue square moving right")]
    assert partial == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    # level 2: the relation is the third check
    still = render(parse("a green square above a blue triangle"), 0)
    assert score_video(still, parse("a green square below a blue triangle"))["partial"] == pytest.approx(2 / 3)

    cfg = SimpleNamespace(reward="shapes", shapes_coefs="accuracy=1,partial=0.5", reward_url=None)
    rewards = build_rewards(cfg, default="shapes")
    assert rewards.coefs["accuracy"] == 1 and rewards.coefs["partial"] == 0.5 and rewards.weighted == [
        "partial", "accuracy"]
    # a group whose accuracy is all 0 still ranks its videos by partial credit
    comps = {"accuracy": torch.zeros(4), "partial": torch.tensor([0.0, 1 / 3, 2 / 3, 1 / 3])}
    adv = group_advantages(comps, rewards.coefs, group_size=4)
    assert adv.values[2] > adv.values[1] == adv.values[3] > adv.values[0]
    assert group_advantages(comps, ShapesReward().coefs, group_size=4).values.abs().max() == 0

    for spec, needle in [("motion=1", "weight partial"), ("size=1", "NAME in accuracy, partial"),
                         ("accuracy=x", "not a number"), ("accuracy=0", "weights nothing")]:
        with pytest.raises(UserError, match=needle):
            ShapesReward(spec)
    with pytest.raises(UserError, match="add --reward shapes"):
        build_rewards(SimpleNamespace(reward="brightness", shapes_coefs="partial=1", reward_url=None), default="x")
    with pytest.raises(UserError, match="reward-server"):
        build_rewards(SimpleNamespace(reward=None, shapes_coefs="partial=1", reward_url="http://x"), default="x")


def test_fill_grades_shape_where_the_shape_check_is_all_or_nothing():
    from wan_grpo.tasks.shapes.verifier import FILL_SLACK, Blob, fill_score

    box = Blob(area=80, top=0, left=0, bottom=9, right=9, cy=4.5, cx=4.5)  # fills 0.8 of its box
    assert fill_score(box, "circle") == 1.0
    assert fill_score(box, "square") == pytest.approx(1 - (0.88 - 0.8) / FILL_SLACK)
    assert fill_score(box, "triangle") == pytest.approx(1 - (0.8 - 0.68) / FILL_SLACK)
    assert fill_score(None, "circle") == 0.0
    sliver = Blob(area=20, top=0, left=0, bottom=9, right=9, cy=4.5, cx=4.5)  # fills 0.2: a line, not a triangle
    assert fill_score(sliver, "triangle") == pytest.approx(1 - (0.4 - 0.2) / FILL_SLACK)
    for level in (1, 2):
        for i, scene in enumerate(_sample_scenes(level, 12, seed=9 + level)):
            assert score_video(render(scene, i), scene)["fill"] == 1.0
    # a triangle, a circle and a square drawn for a square caption: shape is 0, 0, 1; fill is graded
    square = parse("a red square moving left")
    scores = [score_video(render(parse(f"a red {s} moving left"), 0), square) for s in ("triangle", "circle", "square")]
    assert [r["shape"] for r in scores] == [0.0, 0.0, 1.0]
    assert 0 < scores[0]["fill"] < scores[1]["fill"] < scores[2]["fill"] == 1.0
    assert ShapesReward("fill=1").coefs["fill"] == 1


def test_fill_peak_tells_a_circle_at_its_bands_edge_from_one_at_its_centre():
    from wan_grpo.tasks.shapes.verifier import FILL_SLACK, RENDERED_FILL, Blob, fill_peak_score, fill_score

    centre = Blob(area=79, top=0, left=0, bottom=9, right=9, cy=4.5, cx=4.5)  # fills 0.79: a rendered circle
    edge = Blob(area=70, top=0, left=0, bottom=9, right=9, cy=4.5, cx=4.5)  # 0.70: still in the circle band
    assert fill_score(centre, "circle") == fill_score(edge, "circle") == 1.0  # the band cannot tell them apart
    assert fill_peak_score(centre, "circle") == pytest.approx(1.0)
    assert fill_peak_score(edge, "circle") == pytest.approx(1 - (0.79 - 0.70) / FILL_SLACK)
    assert fill_peak_score(edge, "square") == pytest.approx(1 - (1.0 - 0.70) / FILL_SLACK)
    assert fill_peak_score(edge, "triangle") == pytest.approx(1 - (0.70 - RENDERED_FILL["triangle"]) / FILL_SLACK)
    assert fill_peak_score(Blob(area=10, top=0, left=0, bottom=9, right=9, cy=4.5, cx=4.5), "square") == 0.0
    assert fill_peak_score(None, "circle") == 0.0
    # the renderer's own videos sit at their shape's peak, within its few per cent of spread in fill
    for level in (1, 2):
        for i, scene in enumerate(_sample_scenes(level, 12, seed=9 + level)):
            assert score_video(render(scene, i), scene)["fill_peak"] > 0.94
    square = parse("a red square moving left")
    scores = [score_video(render(parse(f"a red {s} moving left"), 0), square) for s in ("triangle", "circle", "square")]
    assert scores[0]["fill_peak"] < scores[1]["fill_peak"] < scores[2]["fill_peak"] == 1.0
    assert ShapesReward("fill_peak=1").coefs["fill_peak"] == 1


def test_label_pixels_is_the_nearest_palette_colour_within_the_distance():
    from wan_grpo.tasks.shapes.verifier import MAX_DISTANCE, PALETTE, label_pixels

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    video[0, 0, :2] = [(120, 30, 30), (121, 30, 30)]  # the background grey, 90 and 91 away: in, then out
    dist = np.sqrt(((video.astype(np.float64)[..., None, :] - PALETTE) ** 2).sum(-1))  # float64 reference
    expected = np.where(dist.min(-1) > MAX_DISTANCE, -1, dist.argmin(-1))
    labels = label_pixels(video)
    assert (labels == expected).all()
    assert labels[0, 0, :2].tolist() == [0, -1]
    assert len(set(labels.ravel().tolist())) == len(PALETTE) + 1  # every colour and "none" occur


def _largest_region_by_search(mask):
    """Reference: breadth-first search from each unseen pixel in raster order; the first largest region."""
    from collections import deque

    seen, best = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], region, queue = True, [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for n in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and not seen[n]:
                    seen[n] = True
                    queue.append(n)
        if len(region) > len(best):
            best = region
    return best


def test_largest_blob_is_the_first_largest_four_connected_region():
    from wan_grpo.tasks.shapes.verifier import MIN_AREA, largest_blob

    rng = np.random.default_rng(0)
    masks = [rng.random((SIZE, SIZE)) < p for p in (0.3, 0.5, 0.6, 0.7) for _ in range(5)]
    tie = np.zeros((SIZE, SIZE), dtype=bool)
    tie[40:46, 40:46] = tie[2:8, 50:56] = True  # two 36-pixel squares: the upper one is first in raster order
    diagonal = np.zeros((SIZE, SIZE), dtype=bool)
    diagonal[10:16, 10:16] = diagonal[16:21, 16:21] = True  # touching only at a corner: two regions, 36 and 25
    for mask in [*masks, tie, diagonal]:
        ref, blob = _largest_region_by_search(mask), largest_blob(mask)
        if len(ref) < MIN_AREA:
            assert blob is None
            continue
        ys, xs = np.array(ref).T
        assert (blob.area, blob.top, blob.left, blob.bottom, blob.right) == (
            len(ref), ys.min(), xs.min(), ys.max(), xs.max())
        assert (blob.cy, blob.cx) == (ys.mean(), xs.mean())
    assert largest_blob(tie).top == 2
    assert largest_blob(diagonal).area == 36
    assert largest_blob(np.zeros((SIZE, SIZE), dtype=bool)) is None


def test_clean_is_one_on_renders_and_falls_with_stray_pixels():
    """``clean`` (logged, never trained): the quality proxy for over-optimisation checks."""
    rng = np.random.default_rng(0)
    for level in (1, 2):
        for i, scene in enumerate(_sample_scenes(level, 12, seed=5 + level)):
            video = render(scene, i)
            assert score_video(video, scene)["clean"] == 1.0
            speckled = video.copy()
            ys, xs = rng.integers(0, SIZE, 200), rng.integers(0, SIZE, 200)
            speckled[:, ys, xs] = (200, 120, 90)  # stray off-palette pixels everywhere
            dirty = score_video(speckled, scene)
            assert 0.85 < dirty["clean"] < 0.97, dirty["clean"]  # ~200 of ~3700 background pixels


def test_build_stages_parse_with_an_optional_dataset():
    import argparse

    from wan_grpo.tasks.shapes.build import Stage

    assert Stage.parse("both:1000:1e-3:2:shapes:2") == Stage("high,low", 1000, 1e-3, 2, "shapes:2")
    assert Stage.parse("high:1500:0.001:2").dataset is None
    assert Stage.parse("both:1000:1e-3:2:shapes:2").label() == "both:1000:0.001:2:shapes:2"
    for bad in ("both:1000:1e-3", "mid:10:1e-3:1", "low:x:1e-3:1"):
        with pytest.raises(argparse.ArgumentTypeError, match="EXPERTS"):
            Stage.parse(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="empty DATASET"):
        Stage.parse("low:1000:1e-3:2:")


def test_build_refuses_no_vae_check_videos_before_writing_anything(tmp_path, capsys):
    from wan_grpo.tasks.shapes.build import main as build

    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            build(["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--vae_check_videos", bad])
        assert "--vae_check_videos must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_short_build_is_deterministic_and_loads(tmp_path):
    """``make shapes-base-full`` in miniature (its VAE defaults but 3 steps, 4 SFT steps of both experts, 2 of the
    high-noise expert, level-1 data): two builds write the same weights, the first losses are the recorded
    ones, the card records the VAE's recipe, and the result loads as a --task shapes model."""
    import argparse
    import json

    from safetensors.torch import load_file

    from wan_grpo.config import SampleConfig
    from wan_grpo.grpo.metrics import read_metrics
    from wan_grpo.runtime import load_model
    from wan_grpo.tasks.shapes.build import main as build
    from wan_grpo.tasks.shapes.build import vae_recipe

    args = ["--vae_steps", "3", "--stage", "both:4:2e-3:1", "--stage", "high:2:1e-3:2", "--dataset", "shapes:1",
            "--vae_check_videos", "1"]
    for name in ("a", "b"):
        assert build(["--out", str(tmp_path / name / "model"), "--work", str(tmp_path / name / "work"), *args]) == 0
    for sub in ("transformer", "transformer_2", "vae"):
        a, b = (load_file(tmp_path / n / "model" / sub / "diffusion_pytorch_model.safetensors") for n in "ab")
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    card = json.loads((tmp_path / "a" / "model" / "build.json").read_text())
    assert card["stages"] == ["both:4:0.002:1", "high:2:0.001:2"]
    assert card["vae_steps"] == 3 and card["vae_init"] == "tasks/shapes/vae_warm_start" and "vae_from" not in card
    assert card["vae_lr"] == 2e-3 and card["vae_level1_share"] == 0.5
    assert card["vae"] == {"z_dim": 16, "scale_factor_temporal": 4, "dim_mult": [1, 2, 4, 4]}
    assert set(card["vae_round_trip"]) == {"level1", "level2"}
    vae_losses = json.loads((tmp_path / "a" / "work" / "vae_losses.json").read_text())
    sft = [r["loss"] for r in read_metrics(tmp_path / "a" / "work" / "sft-0")]
    high = [r["loss"] for r in read_metrics(tmp_path / "a" / "work" / "sft-1")]
    assert vae_losses == pytest.approx(RECORDED_VAE, rel=1e-3)
    assert sft == pytest.approx(RECORDED_SFT, rel=1e-3)
    assert high == pytest.approx(RECORDED_HIGH, rel=1e-3)
    components, cfg, _, _ = load_model(SampleConfig(ckpt_dir=str(tmp_path / "a" / "model")), load_text_encoder=False)
    assert cfg.task == "shapes" and components.transformer_2 is not None
    # work/init (trained VAE, random experts) carries its VAE's card, so a build reusing it records the recipe
    init = json.loads((tmp_path / "a" / "work" / "init" / "build.json").read_text())
    assert init["vae_steps"] == 3 and init["vae_round_trip"] == card["vae_round_trip"]
    recipe = {k: card[k] for k in ("vae_steps", "vae_lr", "vae_init", "vae_level1_share")}
    assert vae_recipe(argparse.Namespace(vae_from=str(tmp_path / "a" / "work" / "init")))["vae_from_recipe"] == recipe
    # a build that reuses it records that recipe on its own card
    assert build(["--out", str(tmp_path / "c" / "model"), "--work", str(tmp_path / "c" / "work"), "--vae_from",
                  str(tmp_path / "a" / "work" / "init"), "--stage", "high:1:1e-3:1", "--dataset", "shapes:1",
                  "--vae_check_videos", "1"]) == 0
    reused = json.loads((tmp_path / "c" / "model" / "build.json").read_text())
    assert reused["vae_from_recipe"] == recipe and "vae_steps" not in reused
    assert reused["vae_round_trip"] == card["vae_round_trip"]  # the same VAE weights
    # make shapes-base: the VAE comes from the very folder the build replaces, which stays whole
    vae_before = load_file(tmp_path / "c" / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    assert build(["--out", str(tmp_path / "c" / "model"), "--work", str(tmp_path / "d"), "--vae_from",
                  str(tmp_path / "c" / "model"), "--stage", "low:1:1e-3:1", "--dataset", "shapes:1",
                  "--vae_check_videos", "1"]) == 0
    vae_after = load_file(tmp_path / "c" / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    rebuilt = json.loads((tmp_path / "c" / "model" / "build.json").read_text())
    assert rebuilt["stages"] == ["low:1:0.001:1"] and rebuilt["vae_from_recipe"] == recipe  # not nested
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["model", "work"]  # no .tmp or .old left


def test_the_card_of_a_build_with_vae_from_records_the_reused_vaes_recipe(tmp_path, capsys):
    """--vae_from records the folder and the recipe on the card of the model folder whose vae/ it is (the
    shipped base's: its 2500 steps), null for a VAE without one; a card that is not a JSON object is refused
    before anything is written."""
    import argparse
    import json
    import shutil

    from wan_grpo.tasks.shapes import BASE_DIR
    from wan_grpo.tasks.shapes.build import main as build
    from wan_grpo.tasks.shapes.build import vae_recipe

    shipped = json.loads((BASE_DIR / "build.json").read_text())
    recipe = vae_recipe(argparse.Namespace(vae_from=str(BASE_DIR)))
    assert recipe["vae_from"] == "tasks/shapes/base"  # inside the package: no machine's path
    assert recipe["vae_from_recipe"]["vae_steps"] == shipped["vae_steps"] == 2500
    assert recipe["vae_from_recipe"]["vae_init"] == "tasks/shapes/vae_warm_start"
    bare = tmp_path / "bare"  # a model folder without a card
    shutil.copytree(BASE_DIR / "vae", bare / "vae")
    (bare / "model_index.json").write_text((BASE_DIR / "model_index.json").read_text())
    assert vae_recipe(argparse.Namespace(vae_from=str(bare))) == {"vae_from": str(bare), "vae_from_recipe": None}
    assert vae_recipe(argparse.Namespace(vae_from=str(bare / "vae")))["vae_from_recipe"] is None
    # a card that reused its VAE passes on the recipe that trained it, not a nested one
    trained = recipe["vae_from_recipe"]
    (bare / "build.json").write_text(json.dumps({"vae_from": "tasks/shapes/base", "vae_from_recipe": trained}))
    assert vae_recipe(argparse.Namespace(vae_from=str(bare))) == {"vae_from": str(bare), "vae_from_recipe": trained}
    loose = tmp_path / "loose"  # a VAE folder of its own: the card beside it is another model's, not read
    shutil.copytree(BASE_DIR / "vae", loose / "myvae")
    (loose / "build.json").write_text((BASE_DIR / "build.json").read_text())
    assert vae_recipe(argparse.Namespace(vae_from=str(loose / "myvae")))["vae_from_recipe"] is None
    for bad in ("{not json", "3", "[1, 2]"):
        (bare / "build.json").write_text(bad)
        with pytest.raises(SystemExit):
            build(["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--vae_from", str(bare)])
        assert "its build.json is not a build card" in capsys.readouterr().err
        assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()


# recorded on the CI machine's CPU (x86-64, torch 2.13.0 CPU wheel); other CPUs may round differently
RECORDED_VAE = [0.9494491815567017, 0.8950150012969971, 0.8442957997322083]
RECORDED_SFT = [4.681734085083008, 4.651282787322998, 4.663205623626709, 4.612987041473389]
RECORDED_HIGH = [2.3125226497650146, 2.2998201847076416]


def test_a_build_with_other_vae_flags_and_patch_one_experts(tmp_path, capsys):
    """Non-default VAE flags (time stride 2, the previous base's widths, a random start) and --patch 1
    experts of two heads (64 wide): the model loads and its VAE takes 9 frames to 5 latent frames and back.
    Bad VAE flags, and any VAE flag beside --vae_from, are refused before anything is written."""
    import json

    from wan_grpo.config import SampleConfig
    from wan_grpo.runtime import load_model
    from wan_grpo.tasks.shapes import BASE_DIR
    from wan_grpo.tasks.shapes.build import main as build

    out = tmp_path / "model"
    for flags, says in ((["--vae_time_stride", "4"], "drop --vae_time_stride"),
                        (["--vae_dim_mult", "1,2,4,4", "--vae_level1_share", "0.5"],
                         "drop --vae_dim_mult and --vae_level1_share"),
                        (["--vae_steps", "10"], "drop --vae_steps")):
        with pytest.raises(SystemExit):
            build(["--out", str(out), "--work", str(tmp_path / "bad"), "--vae_from", str(BASE_DIR), *flags])
        assert says in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for flag in ("--vae_init", "--vae_from"):
        with pytest.raises(SystemExit):
            build(["--out", str(out), "--work", str(tmp_path / "bad"), flag, str(tmp_path / "nowhere")])
        assert f"{flag} {tmp_path / 'nowhere'}: no VAE there" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    for bad, says in ((["--vae_steps", "0"], "--vae_steps 0: want >= 1"),
                      (["--vae_z_dim", "0"], "want z_dim >= 1 and a finite lr > 0"),
                      (["--vae_lr", "nan"], "want z_dim >= 1 and a finite lr > 0"),
                      (["--vae_lr", "-1"], "want z_dim >= 1 and a finite lr > 0"),
                      (["--vae_level1_share", "1.5"], "want a share in [0, 1]"),
                      (["--vae_dim_mult", "1,2,4"], "is not four positive widths"),
                      (["--vae_dim_mult", "1,0,4,4"], "is not four positive widths"),
                      (["--heads", "0"], "--heads 0: want >= 1"),
                      (["--edge_weight", "-1"], "--edge_weight -1.0: want a finite number >= 0"),
                      (["--edge_weight", "nan"], "--edge_weight nan: want a finite number >= 0")):
        with pytest.raises(SystemExit):
            build(["--out", str(out), "--work", str(tmp_path / "bad"), *bad])
        assert says in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert build(["--out", str(out), "--work", str(tmp_path / "work"), "--vae_steps", "2", "--vae_time_stride", "2",
                  "--vae_dim_mult", "1,2,2,2", "--vae_init", "none", "--patch", "1", "--heads", "2",
                  "--stage", "both:2:1e-3:1", "--dataset", "shapes:1", "--vae_check_videos", "1"]) == 0
    card = json.loads((out / "build.json").read_text())
    assert card["vae"] == {"z_dim": 16, "scale_factor_temporal": 2, "dim_mult": [1, 2, 2, 2]} and card["patch"] == 1
    assert card["heads"] == 2
    assert card["vae_init"] is None
    components, cfg, _, _ = load_model(SampleConfig(ckpt_dir=str(out)), load_text_encoder=False)
    assert components.vae_scale_factor_temporal == 2
    assert tuple(components.transformer_2.config.patch_size) == (1, 1, 1)
    assert (components.transformer.config.num_attention_heads, components.transformer.config.ffn_dim) == (2, 256)
    with torch.no_grad():
        z = components.vae.encode(torch.zeros(1, 3, 9, 64, 64)).latent_dist.mode()
        assert z.shape[2] == 5 and components.vae.decode(z).sample.shape[2] == 9


def test_vae_level1_share_sets_how_often_the_vae_sees_a_moving_object():
    import numpy as np

    from wan_grpo.tasks.shapes.build import _scene_draw

    def share(level1_share):
        draw, rng = _scene_draw(level1_share), np.random.default_rng(0)
        return np.mean([draw(rng).direction is not None for _ in range(4000)])

    assert share(None) == pytest.approx(72 / 1152, abs=0.015)
    assert share(0.5) == pytest.approx(0.5, abs=0.03) and share(1.0) == 1.0 and share(0.0) == 0.0


def test_vae_warm_start_copies_every_weight_whose_shape_matches():
    from diffusers import AutoencoderKLWan

    from wan_grpo.tasks.shapes import VAE_WARM_START
    from wan_grpo.tasks.shapes.build import vae_config, warm_start

    donor = AutoencoderKLWan.from_pretrained(str(VAE_WARM_START)).state_dict()
    vae = AutoencoderKLWan(**vae_config(time_stride=4))
    new = warm_start(vae, str(VAE_WARM_START))
    assert new and all("time_conv" in name for name in new)
    assert all(torch.equal(v, donor[k]) for k, v in vae.state_dict().items() if k not in new)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_vae_training_round_trip_is_encode_then_decode(stride):
    """The build's VAE loss sees what ``encode``/``decode`` give, with or without time compression (a
    Wan-style 4x VAE shrinks time only on their cached path), and its gradient reaches the encoder."""
    from diffusers import AutoencoderKLWan

    from wan_grpo.tasks.shapes.build import _round_trip, vae_config

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**vae_config(time_stride=stride)).eval()
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    mu, out = _round_trip(vae, x)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert mu.shape == z.shape and z.shape[2] == 1 + 8 // stride
        torch.testing.assert_close(mu, z, rtol=1e-4, atol=1e-5)  # whole clip vs frame by frame: rounding
        torch.testing.assert_close(out.clamp(-1, 1), vae.decode(z).sample, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0


def test_shipped_vae_is_causal_in_time():
    """The Shapes VAE is causal in time, as Wan's: changing frame 0 changes every latent frame, changing
    the last frame only the last, and a change of the last latent frame reaches only the frames it
    decodes to (the last 4: it compresses time 4x). That is how the DiT tells a video from its reverse
    (with frames encoded alone it could not learn the sign of motion)."""
    from diffusers import AutoencoderKLWan

    from wan_grpo.models.vae import decode_latents, encode_videos
    from wan_grpo.tasks.shapes import BASE_DIR

    vae = AutoencoderKLWan.from_pretrained(str(BASE_DIR), subfolder="vae").eval()
    stride = vae.config.scale_factor_temporal
    assert stride == 4
    video, other = render(parse("a red circle moving left"), 0), render(parse("a blue square moving up"), 1)
    first, last = video.copy(), video.copy()
    first[0], last[-1] = other[0], other[-1]
    with torch.no_grad():
        z, z_first, z_last = (encode_videos(vae, torch.from_numpy(v[None])) for v in (video, first, last))
        pixels, pixels_last = decode_latents(vae, z).float(), decode_latents(vae, z_last).float()

    def per_frame(a, b, frame_dim):
        return (a - b).abs().amax(dim=tuple(d for d in range(a.dim()) if d != frame_dim))

    assert z.shape[2] == 3 and (per_frame(z, z_first, 2) > 1e-3).all()
    assert (per_frame(z, z_last, 2)[:-1] < 1e-5).all() and per_frame(z, z_last, 2)[-1] > 1e-3
    assert (per_frame(pixels, pixels_last, 1)[:-stride] == 0).all() and per_frame(pixels, pixels_last, 1)[-1] > 10


@pytest.mark.slow
@pytest.mark.parametrize("level,samples,band", [(1, 8, (0.2, 0.6)), (2, 1, (0.2, 0.6))])
def test_shipped_base_half_follows_heldout_prompts(tmp_path, level, samples, band):
    """The shipped base (``make shapes-base``), re-measured with fixed seeds on at least 64 held-out
    videos per level: visibly imperfect, so training has room. Measured when it was built: level 1
    0.283 +- 0.041 (120 videos; motion 0.88, the sign of motion learnt through the causal VAE), level 2
    0.315 +- 0.032 (216 videos)."""
    import json

    from wan_grpo.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--task", "shapes", "--prompts", f"shapes:{level}:heldout", "--num_samples", str(samples),
                 "--save_dir", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    videos = result["videos"]
    accuracy = [v["accuracy"] for v in videos]
    assert len(accuracy) >= 64
    squares = [v["accuracy"] for v in videos if "square" in v["prompt"]]
    assert result["by_attribute"]["shape"]["square"] == {"accuracy": pytest.approx(np.mean(squares)), "n": len(squares)}
    assert band[0] <= sum(accuracy) / len(accuracy) <= band[1], sum(accuracy) / len(accuracy)
    if level == 1:
        assert sum(v["motion"] for v in videos) / len(videos) >= 0.8


@pytest.mark.slow
def test_demo_trains_then_compares_base_and_trained_on_heldout_prompts(tmp_path, capsys):
    """``make demo`` (python -m wan_grpo.tasks.shapes.demo), cut to one rollout: the summary lines and
    the side-by-side grids a user is pointed at."""
    from wan_grpo.tasks.shapes.demo import main as demo

    save = tmp_path / "demo"
    assert demo(["--save_dir", str(save), "--max_steps", "6", "--save_interval", "6", "--batch_size", "2",
                 "--tensorboard", "false"]) == 0
    out = capsys.readouterr().out
    for level, videos, prompts in ((1, 120, 15), (2, 216, 216)):
        line = next(x for x in out.splitlines() if x.startswith(f"level {level} held-out accuracy: base "))
        assert f"{videos} videos" in line and "->" in line and "paired" in line and f"over {prompts} prompts" in line
        by_shape = out.splitlines()[out.splitlines().index(line) + 1]
        assert by_shape.startswith("  by shape: circle ") and " square " in by_shape and " triangle " in by_shape
        assert (save / f"eval-trained-level{level}" / "compare" / "grid.mp4").stat().st_size > 0


def test_accuracy_by_attribute_counts_each_object_of_a_level2_video():
    from wan_grpo.tasks.shapes.breakdown import by_attribute, format_breakdown

    videos = [{"prompt": "a red square moving left", "accuracy": 0.0},
              {"prompt": "a red circle moving up", "accuracy": 1.0},
              {"prompt": "a blue square above a red triangle", "accuracy": 1.0},
              {"prompt": "a blue circle left of a green circle", "accuracy": None},  # unscored: left out
              {"prompt": "a green circle left of a red circle", "accuracy": float("nan")},  # left out
              {"prompt": "a cat in the snow", "accuracy": 1.0}]  # outside the grammar: left out
    table = by_attribute(videos)
    assert table["colour"] == {"blue": {"accuracy": 1.0, "n": 1}, "red": {"accuracy": 2 / 3, "n": 3}}
    assert table["shape"] == {"circle": {"accuracy": 1.0, "n": 1}, "square": {"accuracy": 0.5, "n": 2},
                              "triangle": {"accuracy": 1.0, "n": 1}}
    assert table["direction"] == {"left": {"accuracy": 0.0, "n": 1}, "up": {"accuracy": 1.0, "n": 1}}
    assert table["relation"] == {"above": {"accuracy": 1.0, "n": 1}}
    assert format_breakdown(table)[1] == "shape: circle 1.00 (1), square 0.50 (2), triangle 1.00 (1)"
    assert by_attribute([{"prompt": "a red circle moving up", "accuracy": 1.0}]).keys() == {"colour", "shape",
                                                                                             "direction"}
    # two circles: the video counts once under circle; each colour once
    same = by_attribute([{"prompt": "a green circle left of a red circle", "accuracy": 1.0}])
    assert same["shape"] == {"circle": {"accuracy": 1.0, "n": 1}} and same["colour"]["red"]["n"] == 1
    assert by_attribute([{"prompt": "a cat in the snow", "accuracy": 1.0}]) == {}


def test_score_video_refuses_frames_that_are_not_uint8_rgb():
    scene = parse("a red circle moving left")
    video = render(scene, 0)
    with pytest.raises(ValueError, match="uint8"):
        score_video(video.astype(np.float32) / 255, scene)  # frames in [0, 1] would all score as background
    with pytest.raises(ValueError, match="uint8"):
        score_video(video[..., :2], scene)
