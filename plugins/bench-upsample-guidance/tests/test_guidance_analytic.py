"""The combination formula against closed forms, in float64.

Data at 2x: x0 = U_2(y), y from the analytic mixture at 1x4x4 (bench.testing.mixture). Its
exact denoiser at 1x8x8 is computed here independently, with full covariances
(component k: mean U mu_k, covariance U diag(s_k^2) U^T, rank 16 in 64 dimensions), and
must equal U_2 D_mix(D_2(x), sigma / 2): the sigma / m alignment. The guided denoiser
must then leave the exact 2x denoiser unchanged for any weight, and with w = 1 give
any 2x model exactly the low-resolution model's pooled prediction while keeping that
model's high frequencies.
"""

from __future__ import annotations

import math

import pytest
import torch
from bench_upsample_guidance.guidance import apply, pool, upsample, vp_sigma, vp_time

from bench import CountingDenoiser, Denoiser
from bench.testing import mixture, single_threaded

LOW, HIGH, M = (1, 4, 4), (1, 8, 8), 2
SIGMAS = (0.05, 0.3, 1.0, 4.0)


class UpsampledMixtureExact(Denoiser):
    """E[x0 | x] for x0 = U(y), y ~ the low mixture, by full-covariance Gaussian algebra."""

    def __init__(self, low) -> None:
        super().__init__()
        self.shape = HIGH
        n_low, n_high = math.prod(LOW), math.prod(HIGH)
        # U as a matrix: column j is the upsampled j-th low-resolution unit image
        self.U = (
            upsample(torch.eye(n_low, dtype=torch.float64).reshape(n_low, *LOW), M).reshape(n_low, n_high).T
        )
        self.mu = low.mu @ self.U.T  # [K, 64]
        self.cov = torch.stack([self.U @ torch.diag(v) @ self.U.T for v in low.var])  # [K, 64, 64]
        self.log_w = low.log_w

    def forward(self, x, sigma, **cond):
        xf, s = x.double().reshape(len(x), -1), float(sigma[0])
        assert bool((sigma == sigma[0]).all()), "one sigma per batch here"
        # Per component: N(x; U mu_k, C_k) with C_k = U S_k U^T + sigma^2 I, by Cholesky
        c = self.cov + s**2 * torch.eye(self.cov.shape[-1], dtype=torch.float64)
        chol = torch.linalg.cholesky(c)  # [K, 64, 64]
        diff = (xf.unsqueeze(1) - self.mu).unsqueeze(-1)  # [B, K, 64, 1]
        solved = torch.cholesky_solve(diff, chol)  # C_k^-1 (x - U mu_k)
        quad = (diff * solved).sum((-2, -1))
        logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logp = -0.5 * (quad + logdet + xf.shape[1] * math.log(2 * math.pi))
        # Responsibilities, and the posterior mean U mu_k + U S_k U^T C_k^-1 (x - U mu_k)
        r = torch.softmax(logp + self.log_w, dim=1)
        means = self.mu + (self.cov @ solved).squeeze(-1)
        return (r.unsqueeze(-1) * means).sum(1).reshape(x.shape)


class TwoResolutions(Denoiser):
    """One 'network' at two resolutions, as a fully convolutional UNet is: `low` on 1x4x4
    inputs, `high` on 1x8x8 inputs. Its own shape is the trained (low) one."""

    def __init__(self, low: Denoiser, high: Denoiser) -> None:
        super().__init__()
        self.low, self.high, self.shape = low, high, LOW

    def forward(self, x, sigma, **cond):
        return (self.low if tuple(x.shape[1:]) == LOW else self.high)(x, sigma)


@pytest.fixture(scope="module")
def low():
    return mixture(shape=LOW, seed=3)


def noisy_upsampled(low, sigma: float, n: int = 6, seed: int = 0):
    """x = U(y) + sigma eps with y drawn from the low mixture."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.multinomial(low.log_w.exp(), n, replacement=True, generator=gen)
    y = low.mu[k] + low.var[k].sqrt() * torch.randn(n, math.prod(LOW), generator=gen, dtype=torch.float64)
    eps = torch.randn(n, *HIGH, generator=gen, dtype=torch.float64)
    return upsample(y.reshape(n, *LOW), M) + sigma * eps


@pytest.mark.parametrize("sigma", SIGMAS)
@single_threaded
def test_exact_2x_denoiser_is_the_low_denoiser_at_sigma_over_m(low, sigma):
    exact = UpsampledMixtureExact(low)
    x = noisy_upsampled(low, sigma)
    s = torch.full((len(x),), sigma, dtype=torch.float64)
    closed = upsample(low(pool(x, M), s / M), M)
    assert torch.allclose(exact(x, s), closed, atol=1e-9)
    # The alignment matters: the low denoiser at sigma itself is another function
    assert not torch.allclose(exact(x, s), upsample(low(pool(x, M), s), M), atol=1e-3)


@pytest.mark.parametrize("w", [0.5, 1.0, 2.0])
@single_threaded
def test_exact_2x_denoiser_is_a_fixed_point_of_guidance(low, w):
    exact = UpsampledMixtureExact(low)
    guided = apply(CountingDenoiser(TwoResolutions(low, exact)), m=M, w=w, eta=1.0)
    assert guided.shape == HIGH
    for sigma in SIGMAS:
        x = noisy_upsampled(low, sigma, seed=1)
        assert torch.allclose(guided(x, sigma), exact(x, torch.full((len(x),), sigma)), atol=1e-9)


@single_threaded
def test_unit_weight_replaces_the_low_frequencies_only(low):
    wrong = mixture(shape=HIGH, seed=5)  # a 2x model with the wrong global structure
    guided = apply(CountingDenoiser(TwoResolutions(low, wrong)), m=M, w=1.0, eta=1.0)
    for sigma in SIGMAS:
        x = noisy_upsampled(low, sigma, seed=2)
        s = torch.full((len(x),), sigma, dtype=torch.float64)
        d_g, d_hat = guided(x, s), wrong(x, s)
        # Pooled: exactly the low-resolution model's prediction at sigma / m
        assert torch.allclose(pool(d_g, M), low(pool(x, M), s / M), atol=1e-12)
        # Within each m x m block: the 2x model's own detail
        assert torch.allclose(
            d_g - upsample(pool(d_g, M), M), d_hat - upsample(pool(d_hat, M), M), atol=1e-12
        )
        assert not torch.allclose(d_g, d_hat, atol=1e-3)


@single_threaded
def test_active_fraction_on_the_vp_time_axis(low):
    counted = CountingDenoiser(TwoResolutions(low, mixture(shape=HIGH, seed=5)))
    guided = apply(counted, m=M, w=1.0, eta=0.4)
    # On above sigma_on, off below; t(sigma_on) = 0.6 t(sigma_max)
    assert math.isclose(float(vp_time(guided.sigma_on)), 0.6 * float(vp_time(low.sigma_max)), rel_tol=1e-9)
    assert math.isclose(float(vp_time(vp_sigma(0.37))), 0.37, rel_tol=1e-12)
    x = noisy_upsampled(low, 1.0)
    counted.count_shape = guided.shape  # as the runner sets it: 2x calls spend the budget
    for sigma, low_calls in ((guided.sigma_on * 1.01, 1), (guided.sigma_on * 0.99, 0)):
        counted.reset()
        guided(x, sigma)
        assert (counted.nfe, counted.extra, counted.extra_cost) == (1, low_calls, low_calls / M**2)
    # w = 0 never makes the low-resolution call
    plain = apply(counted, m=M, w=0.0, eta=1.0)
    counted.reset()
    plain(x, 3.0)
    assert (counted.nfe, counted.extra) == (1, 0)
