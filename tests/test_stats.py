"""bench.stats and the metrics' replicate kernels: index sets, intervals, the verdict
with Holm's correction, and each fast replicate against a direct recomputation
(torch-fidelity's own functions on the resampled features, or brute force)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from test_fidelity import one_thread  # noqa: F401 (autouse: one torch and one BLAS thread)

from bench.metrics import fidelity
from bench.metrics.analytic import _Moments, frechet_replicates, sqrt_psd
from bench.stats import DEFAULT_B, counts, index_sets, paired_interval, std_of, verdict


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- Index sets, std, intervals -----------------------------------------------------------


def test_index_sets_are_deterministic_and_keyed_by_n_and_seed():
    a = index_sets(50, 20, seed=3)
    assert a.shape == (20, 50) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, index_sets(50, 20, seed=3))
    np.testing.assert_array_equal(a, index_sets(50, 40, seed=3)[:20])  # rows do not depend on B
    assert not np.array_equal(a, index_sets(50, 20, seed=4))
    assert not np.array_equal(a[:, :49], index_sets(49, 20, seed=3))
    assert index_sets(7).shape == (DEFAULT_B, 7)
    c = counts(a, 50)
    assert c.shape == (20, 50) and (c.sum(1) == 50).all()
    np.testing.assert_array_equal(c[2], np.bincount(a[2], minlength=50))


def test_std_and_paired_interval():
    r = rng().normal(size=400)
    assert std_of(r) == pytest.approx(np.std(r, ddof=1))
    assert std_of(np.array([1.0, np.nan, 3.0])) == pytest.approx(np.sqrt(2))
    assert std_of(np.array([1.0])) is None
    assert paired_interval(r, r) == (0.0, 0.0)
    low, high = paired_interval(r + 5, r + 0.01 * rng(1).normal(size=400), level=0.9)
    assert 4.9 < low < 5 < high < 5.1
    with pytest.raises(ValueError, match="same index sets"):
        paired_interval(r, r[:-1])


def test_verdict_ties_worse_and_holm():
    # Paired differences with exact quantiles: mean + sd * (normal quantiles), shuffled
    grid = np.array([NormalDist().inv_cdf((i + 0.5) / DEFAULT_B) for i in range(DEFAULT_B)])

    def diff(mean: float, seed: int) -> np.ndarray:
        return mean + 0.14 * rng(seed).permutation(grid)

    shared = 10 + rng(3).normal(size=DEFAULT_B)  # the noise every method shares, sample by sample
    reps = {
        "a": shared,
        "b": shared + diff(0.02, 1),  # tied: a difference well inside its spread
        "c": shared + diff(1.0, 2),  # worse by 7 standard errors of the difference
        "d": shared + diff(0.3, 4),  # worse by ~2.1: at 0.95 alone, but not at Holm's 0.975
    }
    point = {m: float(np.mean(r)) for m, r in reps.items()}
    v = verdict(point, reps, higher_is_better=False)
    assert v["best"] == "a" and v["worse"] == ["c"] and set(v["tied"]) == {"b", "d"}
    assert v["correction"] == "holm" and v["methods"]["a"]["status"] == "best"
    # Holm: the smallest p is tested at 1 - 0.05 / 3, then 1 - 0.05 / 2, then 0.95
    assert [v["methods"][m]["level"] for m in ("c", "d", "b")] == pytest.approx([1 - 0.05 / 3, 0.975, 0.95])
    low, high = v["methods"]["c"]["interval"]
    assert 0.5 < low < 1 < high < 1.5
    # Unadjusted, d alone is significantly worse at 0.95
    assert paired_interval(reps["d"], reps["a"])[0] > 0
    # Higher is better: the order flips
    flipped = verdict({m: -p for m, p in point.items()}, {m: -r for m, r in reps.items()}, True)
    assert flipped["best"] == "a" and flipped["worse"] == ["c"]
    assert flipped["methods"]["c"]["interval"][1] < 0
    # A method against itself is a tie, at exactly 0
    same = verdict({"x": 1.0, "y": 1.0}, {"x": reps["a"], "y": reps["a"].copy()}, False)
    assert same["tied"] == ["y"] and same["methods"]["y"]["interval"] == [0.0, 0.0]


# --- FID / fd replicates ---------------------------------------------------------------


def _fid_by_torch_fidelity(x: torch.Tensor, ref: dict, rows: np.ndarray) -> list[float]:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    out = []
    for row in rows:
        m = _Moments()
        m.update(x[torch.as_tensor(row)])
        out.append(fid_statistics_to_metric(m.stats(), ref, verbose=False)[KEY_METRIC_FID])
    return out


@pytest.mark.parametrize("n, d", [(300, 16), (150, 200), (60, 90)])  # d <= 128, d > 128, n < d
def test_frechet_replicates_equal_torch_fidelity_on_the_resampled_features(n, d):
    g = torch.Generator().manual_seed(d)
    x = 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) + torch.rand(d, generator=g)
    m = _Moments()
    m.update(
        torch.randn(2 * d + 7, d, generator=g, dtype=torch.float64)
        @ torch.rand(d, d, generator=g, dtype=torch.float64)
    )
    ref = m.stats()
    rows = index_sets(n, 4, seed=1)
    rows[0] = np.arange(n)
    fast = frechet_replicates(x, ref["mu"], ref["sigma"], rows)
    np.testing.assert_allclose(fast, _fid_by_torch_fidelity(x, ref, rows), rtol=1e-6)


def test_frechet_replicates_are_fast_on_digits_features():
    """B = 200 on the 64-d digits features; printed with -s (the reply quotes them)."""
    ref = fidelity._dc().reference_features()
    m = _Moments()
    m.update(ref)
    stats = m.stats()
    root = sqrt_psd(torch.from_numpy(stats["sigma"]))
    g = torch.Generator().manual_seed(0)
    for n in (256, 1000, 2000):
        x = ref[torch.randint(0, len(ref), (n,), generator=g)] + 0.3 * torch.rand(n, 64, generator=g)
        start = time.perf_counter()
        fid = frechet_replicates(
            x, stats["mu"], stats["sigma"], index_sets(n, DEFAULT_B), sigma_ref_sqrt=root
        )
        took = time.perf_counter() - start
        print(f"\nFID replicates, B={DEFAULT_B}, d=64, n={n}: {took:.3f} s (std {np.std(fid, ddof=1):.3g})")
        assert fid.shape == (DEFAULT_B,) and took < 2.0


# --- KID and precision/recall replicates ------------------------------------------------------


def _features(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 8, generator=g) + shift).abs()


@pytest.mark.parametrize("n", [40, 70])  # every subset is all samples / subsets of 50 of 70
def test_kid_replicates_equal_torch_fidelity_and_exclude_identical_pairs(n):
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    gen, ref = _features(n, 0, 0.2).double(), _features(90, 1).double()
    size = min(50, n)
    rows = index_sets(n, 3, seed=2)
    rows[0] = np.arange(n)
    fast = fidelity.kid_replicates(gen, ref, rows, subsets=4, size=size)
    one_shot = kid_features_to_metric(gen, ref, kid_subsets=4, kid_subset_size=size, verbose=False)
    assert fast[0] == pytest.approx(one_shot[KEY_METRIC_KID_MEAN], rel=1e-9)
    # Brute force for a resampled row: the U-statistic over pairs of distinct sources
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    for b in (1, 2):
        total = 0.0
        for p, q in fidelity.kid_subsets(n, len(ref), 4, size):
            src = rows[b][p]
            kxx = k(gen[src], gen[src])
            distinct = torch.as_tensor(src[:, None] != src[None, :])
            kyy = k(ref[q], ref[q])
            total += (
                kxx[distinct].mean()
                + (kyy.sum() - kyy.trace()) / (size * (size - 1))
                - 2 * k(gen[src], ref[q]).mean()
            )
        assert fast[b] == pytest.approx(float(total / 4), rel=1e-9)


def test_prc_replicates_equal_torch_fidelity_and_brute_force():
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    n, k = 60, 3
    gen, ref = _features(n, 3, 0.1).double(), _features(80, 4).double()
    rows = index_sets(n, 6, seed=5)
    rows[0] = np.arange(n)
    fast = fidelity.prc_replicates(gen, ref, rows, k)
    one_shot = prc_features_to_metric(gen, ref, prc_neighborhood=k, save_cpu_ram=True, verbose=False)
    assert fast["precision"][0] == pytest.approx(one_shot[KEY_METRIC_PRECISION])
    assert fast["recall"][0] == pytest.approx(one_shot[KEY_METRIC_RECALL])
    # Brute force on the multiset of draws: a draw's radius is its k-th nearest other draw,
    # copies of the same sample excepted
    d_gg, d_rg = torch.cdist(gen, gen), torch.cdist(ref, gen)
    ref_radii = torch.cdist(ref, ref).kthvalue(k + 1, dim=1).values
    inside = (torch.cdist(gen, ref) <= ref_radii).any(1).double()
    for b in range(1, 6):
        src = torch.as_tensor(rows[b])
        others = d_gg[src][:, src].masked_fill(src[:, None] == src[None, :], float("inf"))
        radii = others.kthvalue(k, dim=1).values
        recall = (d_rg[:, src] <= radii).any(1).double().mean()
        assert fast["recall"][b] == pytest.approx(float(recall))
        assert fast["precision"][b] == pytest.approx(float(inside[src].mean()))


# --- Import cost and constants ----------------------------------------------------------------


def test_metric_modules_do_not_import_torch_fidelity():
    code = "import bench.metrics.fidelity, bench.metrics, bench.stats"
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    heavy = {"torch_fidelity", "torchvision", "sklearn", "scipy"}
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert not heavy & imported, heavy & imported


def test_inception_file_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert fidelity.INCEPTION_FILE == Path(URL_INCEPTION_V3).name
