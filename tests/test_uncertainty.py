"""Every quality number's bootstrap standard error against the real spread of the metric.

(a) The bootstrap std of one block of n samples agrees (within a factor 1.5) with the
sample std of the metric over 24 disjoint blocks of n independent samples: fd on the
analytic mixture, FID / KID / precision / recall on the digits (samples of the exact
optimal denoiser by a 4-step Euler sampler, plus pixel noise so no metric sits at its
ideal value). Run with -s to see the figures. (b) Paired: a method against itself is a
tie at exactly 0; blurred digits are significantly worse. (c) The identity index row
reproduces every point value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fidelity import one_thread  # noqa: F401 (autouse: one torch and one BLAS thread)

from bench.contracts import Batch, MetricContext
from bench.metrics import digits_classifier as dc
from bench.models.analytic import mixture
from bench.models.digits import OptimalDenoiser
from bench.plugins import load_registry
from bench.stats import index_sets, std_of, verdict

BLOCKS, N = 24, 256
DIGIT_METRICS = ("fid-digits", "kid-digits", "pr-digits")


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def noise(denoiser, n: int, seed: int) -> torch.Tensor:
    """Unit initial noise for n samples (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *denoiser.shape, generator=g, dtype=torch.float64)


def euler(denoiser, n: int, steps: int, seed: int) -> torch.Tensor:
    """A cheap sampler: Euler on the probability-flow ODE from `noise(denoiser, n, seed)`,
    Karras sigmas (rho 7) down to 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = denoiser.sigma_min ** (1 / 7), denoiser.sigma_max ** (1 / 7)
    sigmas = torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])
    x = noise(denoiser, n, seed) * sigmas[0]
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        x = x + (s_next - s) * (x - denoiser(x, s)) / s
    return x.float()


def feed(registry, name: str, x: torch.Tensor, denoiser=None, cache: dict | None = None, eps=None):
    """A metric state fed `x` (drawn from initial noise `eps`) in batches, as the runner feeds it."""
    denoiser = denoiser or mixture()
    ctx = MetricContext("test", denoiser, len(x), 0, torch.device("cpu"), {} if cache is None else cache)
    state = registry.get("metrics", name).create(ctx)
    eps = torch.zeros_like(x) if eps is None else eps.float()
    for i, (chunk, e) in enumerate(zip(x.split(100), eps.split(100), strict=True)):
        index = torch.arange(i * 100, i * 100 + len(chunk))
        state.update(Batch(chunk, e, index, denoiser.sigma_max))
    return state


def agreement(values: dict[str, list], stds: dict[str, list]) -> None:
    for key in values:
        spread = float(np.std(values[key], ddof=1))
        boot = float(np.sqrt(np.mean(np.square(stds[key]))))
        print(
            f"\n{key}: n={N}, {len(values[key])} disjoint blocks, mean {np.mean(values[key]):.4g}; "
            f"block spread {spread:.3g}, bootstrap std {boot:.3g} (ratio {boot / spread:.2f})"
        )
        assert 1 / 1.5 < boot / spread < 1.5, key


@pytest.fixture(scope="module")
def digit_samples():
    """BLOCKS * N independent samples of the digits' optimal denoiser, 4 Euler steps, noised."""
    denoiser = OptimalDenoiser(dc.digits()[0], "digits-optimal")
    x = euler(denoiser, BLOCKS * N, 4, seed=0)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return (x + 0.3 * noise).clamp(-1, 1)


def _fd_blocks(registry, steps: int) -> tuple[dict, dict]:
    model = mixture()
    x = euler(model, BLOCKS * N, steps, seed=0)
    values, stds = {}, {}
    for block in x.split(N):
        for key, value in feed(registry, "fd", block, model).result().items():
            values.setdefault(key, []).append(value.value)
            stds.setdefault(key, []).append(value.std)
    return values, stds


def test_fd_bootstrap_std_matches_the_spread_over_disjoint_blocks(registry):
    # 3 Euler steps: fd ~ 6, a low-budget cell's error, well above fd's finite-n bias
    agreement(*_fd_blocks(registry, 3))


def test_fd_bootstrap_std_is_conservative_near_the_truth(registry):
    """With 12 steps fd (~0.7 at n = 256) is mostly its own finite-n bias: the statistic is
    near-degenerate and the bootstrap overestimates its spread, by up to sqrt(3) for the
    mean term (bootstrap variance 4 d'Sd/n + 6 tr S^2/n^2 against 4 d'Sd/n + 2 tr S^2/n^2),
    a little more with the covariance term (1.84 measured here)."""
    values, stds = _fd_blocks(registry, 12)
    spread, boot = np.std(values["fd"], ddof=1), np.sqrt(np.mean(np.square(stds["fd"])))
    print(
        f"\nfd near the truth: n={N}, {BLOCKS} blocks, mean {np.mean(values['fd']):.3g}; "
        f"block spread {spread:.3g}, bootstrap std {boot:.3g} (ratio {boot / spread:.2f})"
    )
    assert 1.0 < boot / spread < 2.5


def test_digits_bootstrap_stds_match_the_spread_over_disjoint_blocks(registry, digit_samples):
    values, stds = {}, {}
    cache: dict = {}  # the feature space and its reference, shared as in a run
    for block in digit_samples.split(N):
        for name in DIGIT_METRICS:
            for key, value in feed(registry, name, block, cache=cache).result().items():
                assert value.n == N and value.std > 0
                values.setdefault(key, []).append(value.value)
                stds.setdefault(key, []).append(value.std)
    assert set(values) == {"fid_digits", "kid_digits", "precision_digits", "recall_digits"}
    agreement(values, stds)


def test_reference_std_is_the_plain_standard_error_and_the_bootstrap_agrees(registry):
    model = mixture()
    x = euler(model, 300, 4, seed=2)
    state = feed(registry, "reference", x, model, eps=noise(model, 300, seed=2))
    value = state.result()["reference_rmse"]
    boot = std_of(state.replicates(index_sets(300))["reference_rmse"])
    print(f"\nreference_rmse: n=300, plain standard error {value.std:.3g}, bootstrap std {boot:.3g}")
    assert boot == pytest.approx(value.std, rel=0.15)


def test_paired_verdicts_tie_a_method_with_itself_and_find_blurred_digits_worse(registry, digit_samples):
    x = digit_samples[:N]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    rows = index_sets(N, seed=7)  # the same index sets for every method
    cache: dict = {}
    point, reps = {}, {}
    for method, samples in {"sharp": x, "again": x.clone(), "blurred": blurred}.items():
        for name in DIGIT_METRICS:
            state = feed(registry, name, samples, cache=cache)
            for key, value in state.result().items():
                point.setdefault(key, {})[method] = value.value
                reps.setdefault(key, {})[method] = state.replicates(rows)[key]
    higher = {"precision_digits", "recall_digits"}
    for key in point:
        v = verdict(point[key], reps[key], higher_is_better=key in higher)
        print(
            f"\n{key}: "
            + ", ".join(
                f"{m} {e['status']} {np.round(e['interval'], 4).tolist()}" for m, e in v["methods"].items()
            )
        )
        if key in ("fid_digits", "kid_digits"):
            assert v["best"] in ("sharp", "again") and v["worse"] == ["blurred"]
            other = "again" if v["best"] == "sharp" else "sharp"
            assert v["tied"] == [other] and v["methods"][other]["interval"] == [0.0, 0.0]


def test_identity_rows_reproduce_every_point_value(registry, digit_samples):
    model = mixture()
    x = euler(model, 150, 4, seed=3)
    states = [feed(registry, name, x, model, eps=noise(model, 150, seed=3)) for name in ("fd", "reference")]
    states += [feed(registry, name, digit_samples[:150]) for name in DIGIT_METRICS]
    identity = np.arange(150)[None]
    for state in states:
        reps, default = state.replicates(identity), state.replicates(index_sets(150))
        for key, value in state.result().items():
            assert reps[key][0] == pytest.approx(value.value, rel=1e-6, abs=1e-9), key
            if not key.startswith("reference_"):  # the reference reports its plain standard error
                assert value.std == std_of(default[key]), key
