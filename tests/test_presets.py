"""Which flow shift a run uses: an explicit preset's official value, else the checkpoint's."""

import json
import logging
import shutil

from wan_grpo.config import SampleConfig
from wan_grpo.runtime import load_model


def test_explicit_preset_keeps_the_official_shift_over_the_scheduler_config(tiny_ckpt, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    sched = ckpt / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg["shift"] = 3.0  # as the diffusers-format A14B repos ship (their UniPC says flow_shift 3.0)
    sched.write_text(json.dumps(cfg))
    caplog.set_level(logging.INFO, logger="wan_grpo")
    _, filled, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt), task="t2v-A14B"), load_text_encoder=False)
    assert filled.sample_shift == 12.0
    assert "official t2v-A14B value (the checkpoint's scheduler config says 3" in caplog.text
    caplog.clear()
    _, filled, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt)), load_text_encoder=False)
    assert filled.task == "t2v-A14B" and filled.sample_shift == 3.0
    assert "not the official 12 of t2v-A14B" in caplog.text
    _, filled, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt), task="t2v-A14B", sample_shift=7.0),
                                 load_text_encoder=False)
    assert filled.sample_shift == 7.0
