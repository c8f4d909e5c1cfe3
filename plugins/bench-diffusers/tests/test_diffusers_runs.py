"""Through the real runner: counted NFE equals every feasible budget 1..20; the sigmas
Plan.sigmas reports are the ones the network is evaluated at; bad options are one-line
UsageErrors; a flow scheduler on a non-flow model is an infeasible cell with its reason."""

from __future__ import annotations

import pytest
import torch

from bench import CellSpec, Denoiser, Method, RunConfig, SampleNoise, Spec, resolve
from bench.errors import Infeasible, UsageError
from bench.testing import gaussian, run_records, samplers_of

BUDGETS = list(range(1, 21))
NAMES = samplers_of("bench-diffusers")


def test_counted_nfe_is_the_budget_through_the_runner(registry, tmp_path):
    config = RunConfig(models=["gaussian"], methods=[Method(Spec.parse(n)) for n in NAMES], nfe=BUDGETS,
                       num_samples=2, batch_size=2, metrics=[], out=tmp_path / "run")
    records = run_records(config, registry)
    assert len(records) == len(NAMES) * len(BUDGETS)
    for r in records:
        sampler = registry.get("samplers", r["sampler"])
        if r["status"] == "infeasible":
            if sampler.name.endswith("flow-match-euler"):
                assert "flow" in r["reason"]
                continue
            with pytest.raises(Infeasible):  # the planner's refusal, not a failure
                sampler.plan(r["nfe"], dict(sampler.options))
            continue
        assert r["status"] == "ok", r.get("reason")
        assert r["nfe_counted"] == r["plan_nfe"] == r["nfe"], r
        assert "reason" not in r, r["reason"]
    ok = [r for r in records if r["status"] == "ok"]
    feasible = {n: sorted(r["nfe"] for r in ok if r["sampler"] == n) for n in NAMES}
    assert feasible["diffusers-heun"] == list(range(1, 21, 2))
    assert feasible["diffusers-pndm"] == list(range(13, 21))
    assert feasible["diffusers-flow-match-euler"] == []
    special = ("diffusers-heun", "diffusers-pndm", "diffusers-flow-match-euler")
    assert all(feasible[n] == BUDGETS for n in NAMES if n not in special)


class Recorder(Denoiser):
    """The Gaussian, remembering the sigmas it is called at."""

    def __init__(self, inner: Denoiser) -> None:
        super().__init__()
        self.inner, self.shape, self.seen = inner, inner.shape, []
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.flow = getattr(inner, "flow", False)

    def forward(self, x, sigma):
        self.seen.append(float(sigma[0]))
        return self.inner(x, sigma)


@pytest.mark.parametrize("name", NAMES)
def test_plan_sigmas_are_where_the_network_is_evaluated(registry, name):
    sampler = registry.get("samplers", name)
    base = gaussian(shape=(1, 4, 4))
    if name.endswith("flow-match-euler"):
        base.flow, base.sigma_max = True, 1e4
    model = Recorder(base)
    plan = sampler.plan(13, dict(sampler.options))  # 13: feasible for all (Heun 7 steps, PNDM 4)
    sigmas = plan.sigmas(model, "cpu")
    assert len(sigmas) == plan.steps + 1 and bool((sigmas[:-1] > sigmas[1:]).all())
    x = SampleNoise(0, range(2), model.shape, "cpu")() * sigmas[0].float()
    noise = lambda: torch.randn_like(x)  # noqa: E731
    sampler.sample(model, x, sigmas.float(), noise=noise, **sampler.options, **plan.options)
    assert len(model.seen) == 13
    visited = torch.tensor(sorted(set(model.seen), reverse=True), dtype=torch.float64)
    assert torch.allclose(visited, sigmas[: len(visited)], rtol=1e-5), (visited, sigmas)
    assert plan.to_zero == (float(sigmas[-1]) == 0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("diffusers-unipc:timestep_spacing=middle", "'timestep_spacing': 'middle' is not one of"),
        ("diffusers-dpmsolver-multistep:solver_order=5", "'solver_order': 5 is not one of 1, 2, 3"),
        ("diffusers-ddim:eta=much", "cannot read 'much' as float"),
        ("diffusers-ddim:eta=-1", "'eta': -1.0 is out of range"),
        ("diffusers-euler:use_karras_sigmas=true:use_beta_sigmas=true", "at most one of"),
        ("diffusers-dpmsolver-multistep:algorithm_type=sde-dpmsolver", "final_sigmas_type"),
        ("diffusers-heun:churn=1", "has no option 'churn'"),
        ("diffusers-unipc:solver_type=bh1", "set final_sigmas_type=sigma_min"),
    ],
)
def test_bad_options_are_one_line_usage_errors(registry, spec, message):
    with pytest.raises(UsageError, match=message) as info:  # its options resolved, then its plan
        resolve(registry, CellSpec("gaussian", Method(Spec.parse(spec)), 5))
    assert "\n" not in str(info.value)


def test_aliases_are_the_class_names(registry):
    assert registry.get("samplers", "dpmsolvermultistepscheduler").name == "diffusers-dpmsolver-multistep"
    assert registry.get("samplers", "pndmscheduler").name == "diffusers-pndm"
