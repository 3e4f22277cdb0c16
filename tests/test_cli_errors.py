"""Bad input: one line on stderr that names the fix, exit code 2, nothing written."""

import json
import subprocess
import sys

import pytest

from wan_grpo.cli import main


def run_cli(capsys, args):
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("wan-grpo")]
    return rc, err


@pytest.mark.parametrize("args,needle", [
    (["--ckpt_dir", "/no/such/dir"], "does not exist"),
    (["--size", "60*64"], "not divisible by the VAE stride times patch size (16*16)"),
    (["--size", "sixty"], "write it as e.g. 832*480"),
    (["--frame_num", "6"], "is not 4k+1; use e.g. 5"),
    (["--sample_solver", "ddim"], "invalid choice: 'ddim'"),
    (["--task", "t2v-A14B"], "needs --ckpt_dir"),
])
def test_bad_sample_input(capsys, tmp_path, args, needle):
    out = tmp_path / "x.mp4"
    rc, err = run_cli(capsys, ["sample", "--output", str(out), *args])
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_not_a_wan_checkpoint(capsys, tmp_path):
    rc, err = run_cli(capsys, ["sample", "--ckpt_dir", str(tmp_path)])
    assert rc == 2 and "no model_index.json" in err[0] and "pass a diffusers-format" in err[0]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    rc, err = run_cli(capsys, ["sample", "--ckpt_dir", str(tmp_path)])
    assert rc == 2 and "'FluxPipeline' pipeline, not Wan2.2" in err[0]


def test_original_layout_is_named(capsys, tmp_path):
    (tmp_path / "high_noise_model").mkdir()
    rc, err = run_cli(capsys, ["sample", "--ckpt_dir", str(tmp_path)])
    assert rc == 2 and "original Wan2.2 layout" in err[0]


def test_python_m_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "wan_grpo", "sample", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--sample_solver" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "wan_grpo", "sample", "--sampel_steps", "3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "unrecognized arguments" in bad.stderr


def test_train_config_checks_its_fields_when_made():
    """Ranges and cross-field checks run in TrainConfig.__post_init__ (as TRL's GRPOConfig), so a config
    built in Python fails as early as one built from flags."""
    from wan_grpo.errors import UserError
    from wan_grpo.grpo.config import TrainConfig

    for kwargs, needle in [({"max_steps": 3, "optimizer_steps_per_rollout": 2}, "use 2 or 4"),
                           ({"optimizer_steps_per_rollout": 0}, "optimizer_steps_per_rollout"),
                           ({"algorithm": "nft", "ratio_norm": True}, "--algorithm grpo"),
                           ({"sample_solver": "unipc"}, "--algorithm nft for any solver"),
                           ({"best_of_n": 3}, "must be even")]:
        with pytest.raises(UserError, match=needle):
            TrainConfig(**kwargs)
    assert TrainConfig(algorithm="nft", sample_solver="unipc").rollout_solver == "unipc"
    assert TrainConfig().rollout_solver == "sde"


def test_reward_flag_errors_come_before_any_model_loads(capsys, tmp_path, monkeypatch):
    import wan_grpo.evaluate as evaluate
    import wan_grpo.grpo.trainer as trainer

    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the reward flags were checked")

    monkeypatch.setattr(trainer, "load_model", never)
    monkeypatch.setattr(evaluate, "load_model", never)
    out = tmp_path / "out"
    for args, needle in [
        (["train", "--task", "shapes", "--prompts", "shapes:1:train", "--shapes_coefs", "size=1"], "NAME in accuracy"),
        (["train", "--task", "shapes", "--prompts", "shapes:1:train", "--reward", "brightness", "--shapes_coefs",
          "partial=1"], "add --reward shapes"),
        (["eval", "--task", "shapes", "--prompts", "shapes:1:val", "--shapes_coefs", "accuracy=0"], "weights nothing"),
        (["eval", "--prompts", "shapes:1:val", "--reward", "videoalign", "--vq_coef", "0"], "all 0"),
    ]:
        rc, err = run_cli(capsys, [*args, "--save_dir", str(out)])
        assert rc == 2 and len(err) == 1 and needle in err[0], (args, err)
        assert not out.exists()
