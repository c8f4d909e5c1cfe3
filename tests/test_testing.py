"""The conformance suite (bench.testing) catches each way a sampler can break its contract.

Broken samplers are installed as a real plugin distribution (entry point, dist-info) and
found by discovery, as a plugin author's would be; good samplers pass.
"""

from __future__ import annotations

import pytest

from bench import testing

BROKEN = """
import math
import torch
from bench import Denoiser, Modifier, Plan, Sampler, Schedule, hookimpl
from bench.errors import Infeasible


def plan(nfe, options):
    return Plan(steps=nfe, nfe=nfe)


def euler(model, x, sigmas, *, noise=None, scale=1.0, **_):
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        d = (x - model(x, s[i])) / s[i]
        x = x + scale * (s[i + 1] - s[i]) * d
    return x


def ancestral(model, x, sigmas, *, noise=None, s_noise=1.0, draw=None, **_):
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        up = 0.0 if s[i + 1] == 0 else s[i + 1] * math.sqrt(1 - s[i + 1] ** 2 / s[i] ** 2)
        down = math.sqrt(s[i + 1] ** 2 - up**2)
        x = x + (down - s[i]) * (x - denoised) / s[i]
        if up > 0:
            x = x + s_noise * up * (draw(x) if draw else noise())
    return x


def overspend(model, x, sigmas, **kw):
    model(x, float(sigmas[0]))
    return euler(model, x, sigmas)


def underspend(model, x, sigmas, **kw):
    return euler(model, x, sigmas[1:]) if len(sigmas) > 2 else euler(model, x, sigmas)


def plan_inexact(nfe, options):
    return Plan(steps=max(1, nfe - 1), nfe=max(1, nfe - 1))


def plan_crashes(nfe, options):
    if nfe % 2:
        raise ValueError("odd")
    return Plan(steps=nfe, nfe=nfe)


def batch_dependent(model, x, sigmas, **kw):
    return euler(model, x, sigmas) + 1e-3 * x.mean(0, keepdim=True)


def wrong_shape(model, x, sigmas, **kw):
    return euler(model, x, sigmas).flatten(1)


def undeclared_noise(model, x, sigmas, *, noise=None, **kw):
    return euler(model, x, sigmas) + 1e-3 * noise()


SAMPLERS = [
    Sampler("t-euler", euler, plan, "NFE = steps", "a correct Euler"),
    Sampler("t-ancestral", ancestral, plan, "NFE = steps", "a correct Euler ancestral", stochastic=True),
    Sampler("t-overspend", overspend, plan, "NFE = steps", "one call too many"),
    Sampler("t-underspend", underspend, plan, "NFE = steps", "one call too few"),
    Sampler("t-inexact", euler, plan_inexact, "NFE = steps", "plans under the budget"),
    Sampler("t-crashes", euler, plan_crashes, "NFE = steps", "planner raises ValueError"),
    Sampler("t-global-rng", ancestral, plan, "NFE = steps", "draws from torch's global RNG",
            stochastic=True, options={"draw": torch.randn_like}),
    Sampler("t-deaf", euler, plan, "NFE = steps", "stochastic, but never draws", stochastic=True),
    Sampler("t-undeclared", undeclared_noise, plan, "NFE = steps", "draws noise, says deterministic"),
    Sampler("t-batch", batch_dependent, plan, "NFE = steps", "depends on batch mates"),
    Sampler("t-shape", wrong_shape, plan, "NFE = steps", "flattens its output"),
    Sampler("t-biased", euler, plan, "NFE = steps", "steps 10% short", options={"scale": 0.9}),
    Sampler("t-loud", ancestral, plan, "NFE = steps", "noise 30% too loud", stochastic=True,
            options={"s_noise": 1.3}),
]


def increasing(n, sigma_min, sigma_max, *, to_zero=True, device=None, **_):
    return torch.linspace(sigma_min, sigma_max, n + 1)


class Wrapped(Denoiser):
    # gain * D(x, sigma), calling `inner` or, to bypass the NFE counter, inner.inner

    def __init__(self, inner, gain=1.0, bypass=False):
        super().__init__()
        self.inner, self.gain, self.bypass = inner, gain, bypass
        self.sigma_min, self.sigma_max, self.shape = inner.sigma_min, inner.sigma_max, inner.shape

    def forward(self, x, sigma, **cond):
        return self.gain * (self.inner.inner if self.bypass else self.inner)(x, sigma)


MODIFIERS = [
    Modifier("t-gain", lambda d, gain: Wrapped(d, gain), "scales the prediction", options={"gain": 1.0}),
    Modifier("t-bypass", lambda d: Wrapped(d, bypass=True), "calls the model beneath the counter"),
]


@hookimpl
def register_samplers(register):
    for sampler in SAMPLERS:
        register(sampler)


@hookimpl
def register_schedules(register):
    register(Schedule("t-increasing", increasing, "goes the wrong way"))


@hookimpl
def register_modifiers(register):
    for modifier in MODIFIERS:
        register(modifier)
"""


@pytest.fixture
def broken(plugin_site):
    """The distribution `bench-conformance-cases`, installed and discovered."""
    plugin_site("bench-conformance-cases", BROKEN)
    testing.registry.cache_clear()
    yield testing.samplers_of("bench-conformance-cases")
    testing.registry.cache_clear()


def test_discovery_lists_what_a_distribution_registered(broken):
    assert broken[:2] == ["t-euler", "t-ancestral"] and len(broken) == 13
    assert testing.schedules_of("bench-conformance-cases") == ["t-increasing"]
    with pytest.raises(AssertionError, match="no installed distribution 'bench-nothing-here'"):
        testing.samplers_of("bench-nothing-here")


def test_correct_samplers_pass(broken):
    errors = testing.check_sampler("t-euler", order=1)
    assert errors[128] < errors[8] / 8  # first order: 16x more NFE, about 16x less error
    scores = testing.check_sampler("t-ancestral")
    assert list(scores) == [128] and scores[128] < 3


# Each broken sampler and the words of the failure it must produce
CASES = {
    "t-overspend": "network call .* on a budget of",
    "t-underspend": "the counter saw",
    "t-inexact": "plan it exactly",
    "t-crashes": "must raise bench.errors.Infeasible",
    "t-global-rng": "same seed differ",
    "t-deaf": "ignores its noise stream",
    "t-undeclared": "not declared stochastic",
    "t-batch": "change with the batch size",
    "t-shape": "output shape",
    "t-biased": "error .* to the exact ODE solution|does not fall",
    "t-loud": "miss the data moments",
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_broken_sampler_fails_with_its_reason(broken, name):
    with pytest.raises(AssertionError, match=CASES[name]):
        testing.check_sampler(name)


def test_a_claimed_order_is_measured(broken):
    with pytest.raises(AssertionError, match="measured order 0.9.* expected 2"):
        testing.check_convergence(testing.Case.of("t-euler"), order=2)


def test_options_that_add_noise_are_declared_stochastic(broken):
    """ddim with eta > 0 draws noise, and says so (`stochastic_when`); declared deterministic
    against its options (the override), the check fails."""
    assert testing.Case.of("ddim", {"eta": 1.0}).stochastic and not testing.Case.of("ddim").stochastic
    testing.check_determinism(testing.Case.of("ddim", {"eta": 1.0}), 5)
    with pytest.raises(AssertionError, match="not declared stochastic"):
        testing.check_determinism(testing.Case.of("ddim", {"eta": 1.0}, stochastic=False), 5)


def test_schedules(broken):
    testing.check_schedule("karras")
    with pytest.raises(AssertionError, match="do not decrease"):
        testing.check_schedule("t-increasing")


def test_modifiers(broken):
    gaussian = testing.Case.of("euler").model
    testing.check_modifier("t-gain", model=gaussian, options={"gain": 0.9}, neutral={"gain": 1.0})
    with pytest.raises(AssertionError, match="changes the model's output"):
        testing.check_modifier("t-gain", model=gaussian, neutral={"gain": 1.01})
    with pytest.raises(AssertionError, match="the network ran 4 times, the counter saw 0"):
        testing.check_modifier("t-bypass", model=gaussian)


def test_protocol_check_catches_a_call_that_buys_nothing():
    """The default (stop at sigma_min) passes; EDM's final denoise at sigma_min fails, naming it."""
    testing.check_protocol(testing.Case.of("heun"), 6)
    with pytest.raises(AssertionError, match="buys nothing"):
        testing.check_protocol(testing.Case.of("heun", {"denoise_to_zero": True}), 7)
