"""Feature-space metrics: the digits classifier, streaming vs torch-fidelity's one-shot
computation, the runner and CLI end to end, and the Inception path on random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from threadpoolctl import threadpool_limits
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from bench import Method, Run, Spec
from bench.cli import main
from bench.contracts import Batch, MetricContext
from bench.errors import ModelLoadError, UsageError
from bench.metrics import digits_classifier as dc
from bench.metrics import fidelity
from bench.models.analytic import gaussian
from bench.plugins import load_registry
from bench.reporters.text import render_markdown
from bench.runner import RunConfig, run

ONE_SHOT = dict(cuda=False, cache=False, verbose=False, save_cpu_ram=True, feature_extractor=dc.NAME)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: on a shared 2-core machine spinning threads thrash
    (numpy's eigvals in a 2048-d FID: 10 s on one thread, 59 s on two, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def data():
    images, labels = dc.digits()
    train, test = dc.split()
    return images, train, test


def context(n: int, cache: dict | None = None, **options) -> MetricContext:
    return MetricContext(
        "test", gaussian(), n, 0, torch.device("cpu"), {} if cache is None else cache, options
    )


def stream(
    registry, name: str, x: torch.Tensor, batch: int = 97, cache: dict | None = None, **options
) -> dict:
    """Feed `x` to metric `name` batch by batch, as the runner does; its result."""
    state = registry.get("metrics", name).create(context(len(x), cache, **options))
    for chunk in x.split(batch):
        state.update(Batch(chunk, torch.zeros_like(chunk), torch.arange(len(chunk)), 80.0))
    return state.result()


# --- The digits feature space ---------------------------------------------------------


def test_classifier_is_registered_accurate_and_matches_its_shipped_reference(data):
    images, train, test = data
    assert FEATURE_EXTRACTORS_REGISTRY[dc.NAME] is dc.DigitsFeatureExtractor
    assert dc.DATASET in DATASETS_REGISTRY
    net = dc.load_net()
    # Held-out accuracy of the shipped weights (0.9867 when trained)
    assert dc.accuracy(net, test) > 0.97
    # The shipped reference features are those of all 1797 digits through these weights
    recomputed = dc.extract(net, dc.to_uint8(images))
    torch.testing.assert_close(dc.reference_features(), recomputed, atol=1e-4, rtol=1e-4)


def test_training_is_deterministic():
    first, second = (dc.train(epochs=1).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_16x16_inputs_are_pooled_to_the_8x8_features(data, registry):
    images = data[0][:50]
    space = fidelity.digits_space(context(50))
    upsampled = F.interpolate(images, scale_factor=2, mode="nearest")
    torch.testing.assert_close(space.features(upsampled), space.features(images))
    rgb = images.expand(-1, 3, -1, -1)
    torch.testing.assert_close(space.features(rgb), space.features(images))


def test_fid_of_test_split_vs_train_is_small_and_of_noise_is_large():
    # torch-fidelity's calculate_metrics on the registered extractor (`--evaluate`)
    result = dc.evaluate()
    assert result["test_accuracy"] > 0.97
    assert 0 < result["fid_test_split"] < 1.0
    assert result["fid_noise"] > 20.0 and result["fid_noise"] > 50 * result["fid_test_split"]
    assert result["kid_noise"] > 20 * result["kid_test_split_std"]


def test_streaming_equals_torch_fidelity_one_shot(data, registry):
    images, _, test = data
    # Degraded held-out digits, so every metric is away from its ideal value
    x = images[test] + 0.3 * torch.randn(len(test), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x.clamp(-1, 1)
    values = {}
    for name in ("fid-digits", "kid-digits", "pr-digits"):
        values.update(stream(registry, name, x))
    generated = dc.DigitsDataset()
    generated.images = dc.to_uint8(x)
    one_shot = torch_fidelity.calculate_metrics(
        input1=generated,
        input2=dc.DATASET,
        fid=True,
        kid=True,
        prc=True,
        kid_subsets=fidelity.KID_SUBSETS,
        kid_subset_size=len(x),
        **ONE_SHOT,
    )
    assert values["fid_digits"].value == pytest.approx(one_shot[torch_fidelity.KEY_METRIC_FID], rel=1e-5)
    assert values["fid_digits"].value > 1.0
    assert values["kid_digits"].value == pytest.approx(one_shot[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-4)
    # Every std is a bootstrap standard error (tests/test_uncertainty.py checks it against the
    # spread over disjoint blocks), no longer torch-fidelity's std of KID over its subsets
    assert all(v.std > 0 for v in values.values())
    assert values["precision_digits"].value == pytest.approx(one_shot[torch_fidelity.KEY_METRIC_PRECISION])
    assert values["recall_digits"].value == pytest.approx(one_shot[torch_fidelity.KEY_METRIC_RECALL])
    assert {v.n for v in values.values()} == {len(x)}
    assert values["fid_digits"].title == "FID (digits)" and values["kid_digits"].title == "KID (digits)"


def test_too_few_samples_is_a_usage_error(registry):
    with pytest.raises(UsageError, match="at least 4 samples"):
        registry.get("metrics", "pr-digits").create(context(3))


def test_digits_metrics_through_the_runner(tmp_path, registry):
    config = RunConfig(
        models=["digits-optimal"],
        methods=[Method(Spec("euler")), Method(Spec("heun"))],
        nfe=[4, 16],
        num_samples=48,
        batch_size=20,
        metrics=["fid-digits", "kid-digits"],
        out=tmp_path / "run",
    )
    out, records = run(registry, config)
    assert [r["status"] for r in records] == ["ok"] * 4
    for r in records:
        fid, kid = r["metrics"]["fid_digits"], r["metrics"]["kid_digits"]
        assert fid["n"] == kid["n"] == 48 and kid["std"] > 0 and fid["title"] == "FID (digits)"
    by = {(r["sampler"], r["nfe"]): r["metrics"]["fid_digits"]["value"] for r in records}
    assert by[("euler", 16)] < by[("euler", 4)]
    report = render_markdown(Run.open(out), None).read_text()
    assert "## FID (digits) (lower is better, n=48)" in report
    assert "## KID (digits)" in report and "## fid_digits" not in report


# --- Inception-v3 through torch-fidelity, on random weights ------------------------------


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's network, left at its random initialisation (test set-up only)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """Random Inception-v3 weights in torch-fidelity's layout saved to disk, a reference
    folder of digit PNGs (torch-fidelity reads them as RGB uint8) and the same images."""
    root = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    empty = root / "empty.pth"
    torch.save({}, empty)
    net = _RandomInception("inception-random", ["2048"], feature_extractor_weights_path=str(empty))
    weights = root / "random-inception.pth"
    torch.save(net.state_dict(), weights)
    images = dc.digits()[0][:3]
    folder = root / "ref"
    folder.mkdir()
    for i, img in enumerate(dc.to_uint8(images)):
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i}.png")
    return {"weights": str(weights), "folder": str(folder), "images": images, "root": root}


def test_inception_streams_torch_fidelity_features_and_reads_npz(registry, inception):
    cache: dict = {}
    options = {"fid_weights": inception["weights"], "ref_stats": inception["folder"]}
    # The folder's own images, streamed: the same moments as torch-fidelity's folder statistics
    state = registry.get("metrics", "fid-inception").create(context(3, cache, **options))
    for chunk in inception["images"].split(2):
        state.update(Batch(chunk, chunk, torch.arange(len(chunk)), 80.0))
    streamed, reference = (
        state.samples.stats(),
        fidelity.inception_space(context(3, cache, **options)).reference,
    )
    assert np.abs(reference["mu"]).max() > 0
    np.testing.assert_allclose(
        streamed["mu"], reference["mu"], rtol=1e-5, atol=1e-6 * np.abs(reference["mu"]).max()
    )
    scale = np.abs(reference["sigma"]).max()
    np.testing.assert_allclose(streamed["sigma"], reference["sigma"], atol=1e-5 * scale)
    # Those statistics written as EDM's .npz read back as the reference
    npz = inception["root"] / "ref.npz"
    np.savez(npz, mu=reference["mu"], sigma=reference["sigma"])
    by_npz = fidelity.inception_space(context(3, cache, **{**options, "ref_stats": str(npz)})).reference
    np.testing.assert_array_equal(by_npz["sigma"], reference["sigma"])


def test_inception_through_the_cli(tmp_path, inception):
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=np.zeros(2048), sigma=np.eye(2048))
    out = tmp_path / "run"
    args = ["--fid-weights", inception["weights"], "--ref-stats", str(npz), "--out", str(out)]
    assert main(["run", *RUN, "--num-samples", "3", *args, "--report", "csv"]) == 0
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    fid = record["metrics"]["fid_inception"]
    assert record["status"] == "ok" and fid["n"] == 3 and fid["title"] == "FID (Inception-v3)"
    # mu = 0, sigma = I: FID = |mu_s|^2 + tr(sigma_s) + 2048 - 2 tr(sqrt(sigma_s)) > 0
    assert fid["value"] > 0
    assert json.loads((out / "config.json").read_text())["metric_options"]["ref_stats"] == str(npz)


RUN = [
    "--model",
    "gaussian:1x8x8",
    "--samplers",
    "euler",
    "--nfe",
    "1",
    "--metrics",
    "fid-inception",
    "--quiet",
]


def _run_error(tmp_path, capsys, *args: str) -> tuple[int, str]:
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"  # each configuration its own sweep
    code = main(["run", *RUN, "--num-samples", "3", "--out", str(out), *args])
    return code, capsys.readouterr().err.strip()


def test_missing_or_bad_inception_weights_are_one_line_errors(tmp_path, capsys, monkeypatch, inception):
    ref = ["--ref-stats", inception["folder"]]
    # A path that does not exist: a usage error before any cell, naming the file to put there
    code, err = _run_error(tmp_path, capsys, "--fid-weights", str(tmp_path / "nope.pth"), *ref)
    assert code == UsageError.exit_code and "nope.pth" in err and len(err.splitlines()) == 1
    assert fidelity.INCEPTION_FILE in err and not list(tmp_path.glob("run-*/results.jsonl"))
    # Not a torch file at all, and a state dict of another network
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    for path in (garbage, wrong):
        code, err = _run_error(tmp_path, capsys, "--fid-weights", str(path), *ref)
        assert code == ModelLoadError.exit_code and str(path) in err and fidelity.INCEPTION_FILE in err
        assert len(err.splitlines()) == 1
    # Offline with an empty cache: the error names the file and where it goes
    cache = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(cache))
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    code, err = _run_error(tmp_path, capsys, *ref)
    assert code == UsageError.exit_code and len(err.splitlines()) == 1
    assert str(cache / "hub" / "checkpoints" / fidelity.INCEPTION_FILE) in err


def test_bad_references_are_usage_errors(tmp_path, capsys, inception):
    weights = inception["weights"]
    with pytest.raises(UsageError, match="needs a reference"):
        fidelity.inception_space(context(3, fid_weights=weights))
    with pytest.raises(UsageError, match="neither"):
        fidelity.inception_space(context(3, fid_weights=weights, ref_stats="no-such-dataset"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(3))
    code, err = _run_error(tmp_path, capsys, "--fid-weights", weights, "--ref-stats", str(bad))
    assert code == UsageError.exit_code and "(2048,)" in err and len(err.splitlines()) == 1
