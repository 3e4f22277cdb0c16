"""sde_step against float64 references of docs/math.md, and its sampling statistics."""

import math

import pytest
import torch

from wan_grpo.sampling import sde_step

SHAPE = (3, 4, 2, 5, 6)


def reference(kind, v, x, s, s_next, a, sigma_max):
    """Straight transcription of the formulas, float64, one sample at a time (scalars s, s')."""
    dt = s_next - s
    if kind == "ode":
        return x + dt * v, 0.0
    if kind == "flow":
        denom = sigma_max if s == 1 else s
        std_t = a * math.sqrt(s / (1 - denom))
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        return mean, std_t * math.sqrt(-dt)
    if kind == "dance":
        x0 = x - s * v
        score = -(x - (1 - s) * x0) / s**2
        return x + dt * v - 0.5 * a**2 * score * dt, a * math.sqrt(s - s_next)
    if kind == "cps":
        std = s_next * math.sin(a * math.pi / 2)
        x0, x1 = x - s * v, x + (1 - s) * v
        return x0 * (1 - s_next) + x1 * math.sqrt(s_next**2 - std**2), std


def ref_log_prob(x_next, mean, std):
    if std == 0:
        return 0.0
    d = torch.distributions.Normal(mean, torch.full_like(mean, std))
    return d.log_prob(x_next).mean().item()


@pytest.mark.parametrize("kind", ["flow", "dance", "cps", "ode"])
def test_matches_float64_reference(kind):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x_next = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.8, 0.3], dtype=torch.float64)  # includes s = 1 (uses sigma_max)
    sigma_next = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    a, sigma_max = 0.7, 0.95
    out = sde_step(v, x, sigma, sigma_next, kind=kind, noise_level=a, next_latents=x_next, sigma_max=sigma_max)
    assert out.log_prob.shape == (3,)
    for b in range(3):
        mean, std = reference(kind, v[b], x[b], float(sigma[b]), float(sigma_next[b]), a, sigma_max)
        torch.testing.assert_close(out.mean[b], mean, rtol=1e-12, atol=1e-12)
        assert float(out.std[b].flatten()[0]) == pytest.approx(std, rel=1e-12, abs=1e-15)
        assert float(out.log_prob[b]) == pytest.approx(ref_log_prob(x_next[b], mean, std), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_float32_log_prob_close_to_float64(kind):
    g = torch.Generator().manual_seed(2)
    v, x, xn = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    out64 = sde_step(v, x, 0.6, 0.4, kind=kind, noise_level=0.5, next_latents=xn)
    out32 = sde_step(v.bfloat16(), x.float(), 0.6, 0.4, kind=kind, noise_level=0.5, next_latents=xn.float())
    assert out32.log_prob.dtype == torch.float32
    out64b = sde_step(v.bfloat16().double(), x, 0.6, 0.4, kind=kind, noise_level=0.5, next_latents=xn)
    torch.testing.assert_close(out32.log_prob.double(), out64b.log_prob, rtol=1e-5, atol=1e-5)
    assert out64.log_prob.shape == (3,)


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_samples_have_stated_mean_and_std(kind):
    n = 200_000
    v = torch.full((1, n), 0.3)
    x = torch.full((1, n), -0.2)
    g = torch.Generator().manual_seed(3)
    out = sde_step(v, x, 0.7, 0.5, kind=kind, noise_level=0.8, generator=g)
    z = (out.next_latents - out.mean) / out.std
    # Standardised residuals of n independent draws: mean ~ N(0, 1/n), var ~ 1 +- sqrt(2/n).
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert float(out.std.flatten()[0]) > 0


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_log_prob_at_sample_equals_sampling_log_prob(kind):
    g = torch.Generator().manual_seed(4)
    v, x = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    s, s_next = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.4, 0.0])
    sampled = sde_step(v, x, s, s_next, kind=kind, generator=g, sigma_max=0.95)
    again = sde_step(v, x, s, s_next, kind=kind, next_latents=sampled.next_latents, sigma_max=0.95)
    assert torch.equal(sampled.log_prob, again.log_prob)
    if kind != "cps":
        assert (sampled.log_prob != 0).all()


def test_noise_level_zero_is_euler():
    g = torch.Generator().manual_seed(5)
    v, x = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    euler = sde_step(v, x, 0.7, 0.5, kind="ode")
    for kind in ("flow", "dance", "cps"):
        out = sde_step(v, x, 0.7, 0.5, kind=kind, noise_level=0.0, generator=g)
        torch.testing.assert_close(out.next_latents, euler.next_latents, rtol=1e-6, atol=1e-6)
        assert (out.log_prob == 0).all()
    assert (euler.log_prob == 0).all()


def test_bad_kind_and_sigma_shape():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde_step(x, x, 0.5, 0.4, kind="ddim")
    with pytest.raises(ValueError, match="shape"):
        sde_step(x, x, torch.tensor([0.5, 0.4, 0.3]), 0.2)


# An independent derivation (docs/math.md states the kinds as closed-form means): every stochastic
# kind is a reverse-time SDE dx = [v - g^2/2 * score] dt + g dW of the flow x_s = (1 - s) x0 + s eps,
# whose score is -E[eps | x] / s with E[eps | x] = x + (1 - s) v; CPS instead re-noises the
# predicted x0 along a rotation of the predicted noise.
def drift_form(kind, v, x, s, s_next, a, sigma_max):
    dt = s_next - s
    eps_hat, x0_hat = x + (1 - s) * v, x - s * v
    score = -eps_hat / s
    if kind == "flow":
        g = a * math.sqrt(s / (1 - (sigma_max if s == 1 else s)))
    elif kind == "dance":
        g = a
    elif kind == "ode":
        g = 0.0
    else:  # cps: x' = (1 - s') x0 + s' (cos(a pi/2) eps + sin(a pi/2) xi)
        angle = a * math.pi / 2
        return (1 - s_next) * x0_hat + s_next * math.cos(angle) * eps_hat, s_next * math.sin(angle)
    return x + (v - g**2 / 2 * score) * dt, g * math.sqrt(-dt)


@pytest.mark.parametrize("kind", ["flow", "dance", "cps", "ode"])
def test_mean_and_std_equal_the_reverse_sde_drift_form(kind):
    g = torch.Generator().manual_seed(3)
    v, x = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([1.0, 0.8, 0.3], dtype=torch.float64)
    sigma_next = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    out = sde_step(v, x, sigma, sigma_next, kind=kind, noise_level=0.7, next_latents=x, sigma_max=0.95)
    for b in range(3):
        mean, std = drift_form(kind, v[b], x[b], float(sigma[b]), float(sigma_next[b]), 0.7, 0.95)
        torch.testing.assert_close(out.mean[b], mean, rtol=1e-12, atol=1e-12)
        assert float(out.std[b].flatten()[0]) == pytest.approx(std, rel=1e-12, abs=1e-15)


def gaussian_data_step_variance(kind, s, s_next, a=0.7):
    """Data x0 ~ N(0, 1): x_s ~ N(0, V(s)), V(s) = (1 - s)^2 + s^2, and the exact velocity is
    E[eps - x0 | x] = x (2s - 1) / V(s). One step maps x to c x + std * noise (linear in x), so the
    variance after it is c^2 V(s) + std^2, which a correct reverse SDE keeps equal to V(s') up to
    the O(dt^2) error of one Euler-Maruyama step."""
    var = lambda t: (1 - t) ** 2 + t**2  # noqa: E731
    x = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = sde_step(x * (2 * s - 1) / var(s), x, s, s_next, kind=kind, noise_level=a, next_latents=x)
    c, std = float(out.mean.flatten()[0]), float(out.std.flatten()[0])
    return c**2 * var(s) + std**2 - var(s_next)


@pytest.mark.parametrize("kind", ["flow", "dance", "ode"])
def test_one_step_keeps_the_flow_marginals_of_gaussian_data(kind):
    for s in (0.9, 0.6, 0.3):
        errors = [abs(gaussian_data_step_variance(kind, s, s - dt)) for dt in (0.02, 0.01)]
        # first order in dt would halve the error; a correct step quarters it (second order)
        assert 0 < errors[1] < 0.3 * errors[0], (s, errors)
