"""--attention_backend (diffusers' attention dispatcher) and --compile (regional torch.compile)."""

import shutil

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from wan_grpo.cli import main
from wan_grpo.config import SampleConfig
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.runtime import load_model


@pytest.fixture(autouse=True)
def _restore_active_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put it back."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def _velocity(cfg: SampleConfig) -> torch.Tensor:
    components, cfg, _, _ = load_model(cfg)
    den = MoEDenoiser(components, guidance_scale=4.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    cond = torch.randn(2, 8, components.any_transformer.config.text_dim, generator=g)
    with torch.no_grad():
        return torch.cat([den.predict_velocity(x, t, cond, torch.zeros_like(cond)) for t in (950.0, 300.0)])


@pytest.mark.parametrize("name,needle", [("nope", "is not one of diffusers' backends"), ("flash", "flash")])
def test_unknown_or_uninstalled_backend_is_a_one_line_error(tmp_path, capsys, name, needle):
    if name == "flash":
        try:
            import flash_attn  # noqa: F401
            pytest.skip("flash-attn is installed")
        except ImportError:
            pass
    rc = main(["sample", "--attention_backend", name, "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("wan-grpo")]
    assert len(err) == 1 and needle in err[0] and "--attention_backend" in err[0]
    assert not (tmp_path / "x.mp4").exists()


def test_backend_reaches_every_attention_of_both_experts_and_matches_native():
    components, _, _, _ = load_model(SampleConfig(attention_backend="_native_math"))
    backends = {str(getattr(m.processor, "_attention_backend", "missing"))
                for e in components.experts.values() for m in e.modules() if hasattr(m, "processor")}
    assert backends == {"AttentionBackendName._NATIVE_MATH"} or backends == {"_native_math"}, backends
    default = _velocity(SampleConfig())
    math_kernel = _velocity(SampleConfig(attention_backend="_native_math"))
    assert torch.allclose(math_kernel, default, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_blocks_give_the_same_velocity_and_train():
    components, _, _, _ = load_model(SampleConfig(compile=True))
    compiled = [b for e in components.experts.values() for b in e.blocks if b._compiled_call_impl is not None]
    assert len(compiled) == sum(len(e.blocks) for e in components.experts.values())
    assert torch.allclose(_velocity(SampleConfig(compile=True)), _velocity(SampleConfig()), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_a_compiled_lora_train_step_matches_the_eager_one(tmp_path):
    from wan_grpo.grpo.metrics import read_metrics

    rows = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "true"])):
        assert main(["train", "--task", "tiny", "--num_generations", "4", "--tensorboard", "false", "--log_interval",
                     "0", "--max_steps", "1", "--lora_rank", "4", "--gradient_checkpointing", "true",
                     "--save_dir", str(tmp_path / name), *extra]) == 0
        rows[name] = read_metrics(tmp_path / name)[0]
    for key in ("loss", "grad_norm_high", "grad_norm_low", "reward_mean"):
        assert rows["compiled"][key] == pytest.approx(rows["eager"][key], rel=1e-3, abs=1e-6), key


def test_ulysses_needs_a_context_parallel_backend():
    from wan_grpo.errors import UserError
    from wan_grpo.models.kernels import check_context_parallel

    with pytest.raises(UserError, match="does not support --ulysses_size"):
        check_context_parallel("_native_math", 2)
    check_context_parallel("native", 2)
    check_context_parallel("_native_math", 1)
