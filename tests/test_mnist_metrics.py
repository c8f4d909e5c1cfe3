"""MNIST's data and feature space: the idx reader, the shipped assets (floor subset,
classifier weights, test-set reference features), the extractor registered with
torch-fidelity, fid/kid/pr-mnist against torch-fidelity's own calculate_metrics, the
real-data floor a model without data of its own gets from the metric, and the metrics a
1x28x28 model gets by default, end to end through `bench run`. Shipped files only: no
training, no download."""

from __future__ import annotations

import gzip
import hashlib
import json
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
from safetensors.torch import load_file
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from bench import CellSpec, Method, Spec, data
from bench.cell import load_model
from bench.cli import main
from bench.contracts import Batch, MetricContext
from bench.errors import UsageError
from bench.metrics import fidelity, metric_set
from bench.metrics import mnist_classifier as mc
from bench.metrics.classifier import Images
from bench.models.analytic import gaussian
from bench.plugins import load_registry
from bench.runner import data_floor

# SHA-256 of the shipped assets as loaded (arrays' bytes; the weights' tensors in key order)
SUBSET_IMAGES = "4cb1313c4fdfc44e17bb34bfb3609441715751a207ba14e416988471a8224641"
REFERENCE = "d90338344d15de3246596da5336cf157deb7a1edec276319a577adcecf0d1baf"
WEIGHTS = "2e57292a63f699cccb870eec85856dc97d36400160ddb93afaa0c3023d25726a"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def context(n: int, model=None, cache: dict | None = None) -> MetricContext:
    model = model if model is not None else gaussian(shape=(1, 28, 28))
    return MetricContext("test", model, n, 0, torch.device("cpu"), {} if cache is None else cache)


def stream(registry, name: str, x: torch.Tensor, ctx: MetricContext, batch: int = 97) -> dict:
    """Feed `x` to metric `name` batch by batch, as the runner does; its result."""
    state = registry.get("metrics", name).create(ctx)
    for chunk in x.split(batch):
        state.update(Batch(chunk, torch.zeros_like(chunk), torch.arange(len(chunk)), 80.0))
    return state.result()


# --- The idx reader ------------------------------------------------------------------------


def idx(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes: zero, zero, 0x08, rank, big-endian dimensions, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_idx_files_read_back_and_bad_ones_are_refused(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(idx(images)), images)
    np.testing.assert_array_equal(data.read_idx(idx(np.arange(5))), np.arange(5))
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(b"\x00\x00\x0d\x01" + idx(images)[4:])  # float type code
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(idx(images)[:-1])
    # A wheel whose idx files are not MNIST's canonical ones
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for (_, kind), (name, _) in data.FILES.items():
            z.writestr(f"{data.IDX}/{name}", gzip.compress(idx(images if kind == "images" else np.zeros(3))))
    with pytest.raises(UsageError, match="not the canonical file"):
        data.mnist("test", wheel)
    with pytest.raises(UsageError, match="is not one of train, test"):
        data.mnist("valid", wheel)
    # A file under the wheel's name that is not the wheel: refused by its digest, before any read
    (tmp_path / data.WHEEL).write_bytes(b"not a wheel")
    monkeypatch.setenv("BENCH_MNIST_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="delete it and rerun"):
        data.mnist_wheel()


# --- The shipped assets --------------------------------------------------------------------


def test_the_floor_subset_is_ten_thousand_training_images():
    s = data.subset()
    images, index, labels = s["images"], s["indices"], s["labels"]
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert sha256(images) == SUBSET_IMAGES
    # Distinct training-set positions in order, every class present at about its tenth
    assert np.all(np.diff(index) > 0) and 0 <= index[0] and index[-1] < 60_000
    assert np.bincount(labels, minlength=10).min() > 800
    # mnist_samples: v / 127.5 - 1, without replacement up to 10,000, seeded
    x = data.mnist_samples(300, seed=1)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    as_uint8 = fidelity._dc().to_uint8(x)[:, 0].numpy()
    rows = {r.tobytes(): i for i, r in enumerate(images)}
    assert len({rows[r.tobytes()] for r in as_uint8}) == 300  # each a subset image, none twice
    assert torch.equal(data.mnist_samples(300, seed=1), x) and not torch.equal(data.mnist_samples(300), x)
    assert data.mnist_samples(10_001).shape == (10_001, 1, 28, 28)


def test_the_classifier_and_reference_are_the_shipped_ones_and_classify_real_digits():
    state = load_file(mc.WEIGHTS)
    assert sha256(*(state[k].numpy() for k in sorted(state))) == WEIGHTS
    reference = mc.reference_features()
    assert reference.shape == (10_000, 64) and reference.dtype == torch.float32
    assert sha256(reference.numpy()) == REFERENCE
    assert reference.min() >= 0 and (reference > 0).float().mean() > 0.2  # after a ReLU, not dead
    # Training digits (the floor subset's first 2000) are classified as MNIST's labels say
    s = data.subset()
    images, labels = torch.from_numpy(s["images"][:2000]).unsqueeze(1), torch.from_numpy(s["labels"][:2000])
    assert mc.accuracy(mc.load_net(), images, labels) > 0.98


# --- The feature extractor -----------------------------------------------------------------


def test_the_extractor_is_registered_and_takes_grey_rgb_and_56x56():
    assert FEATURE_EXTRACTORS_REGISTRY[mc.NAME] is mc.MnistFeatureExtractor
    assert mc.DATASET in DATASETS_REGISTRY
    space = fidelity.mnist_space(context(8))
    x = data.mnist_samples(40)
    features = space.features(x)
    assert features.shape == (40, 64)
    upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(space.features(upsampled), features)
    # 56x56 is average-pooled: +-8 grey levels in a checkerboard within each 2x2 block change nothing
    grey = fidelity._dc().to_uint8(x).clamp(8, 247)
    checker = torch.tensor([[8, -8], [-8, 8]]).repeat(28, 28)
    detailed = (F.interpolate(grey.float(), scale_factor=2, mode="nearest") + checker).to(torch.uint8)
    torch.testing.assert_close(space.extractor(detailed)[0], space.extractor(grey)[0])
    torch.testing.assert_close(space.features(x.expand(-1, 3, -1, -1)), features)
    with pytest.raises(ValueError, match="side 28k"):
        space.extractor(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_streaming_equals_torch_fidelity_calculate_metrics(registry, tmp_path):
    # torch-fidelity reads the test set's features from its cache (the shipped reference:
    # the features its own extraction gives, `python -m bench.metrics.mnist_classifier --evaluate`)
    torch.save(mc.reference_features(), tmp_path / f"{mc.DATASET}-{mc.NAME}-features-{mc.FEATURES}.pt")
    n = 200
    x = data.mnist_samples(n) + 0.4 * torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x = x.clamp(-1, 1)
    values = {}
    for name in ("fid-mnist", "kid-mnist"):
        values.update(stream(registry, name, x, context(n)))
    one_shot = torch_fidelity.calculate_metrics(
        input1=Images(fidelity._dc().to_uint8(x)),
        input2=mc.DATASET,
        feature_extractor=mc.NAME,
        fid=True,
        kid=True,
        kid_subsets=fidelity.KID_SUBSETS,
        kid_subset_size=n,
        cuda=False,
        cache=True,
        cache_root=str(tmp_path),
        verbose=False,
        save_cpu_ram=True,
    )
    assert values["fid_mnist"].value == pytest.approx(one_shot[torch_fidelity.KEY_METRIC_FID], rel=1e-5)
    assert values["fid_mnist"].value > 10
    assert values["kid_mnist"].value == pytest.approx(one_shot[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-4)
    assert all(v.std > 0 for v in values.values()) and {v.n for v in values.values()} == {n}
    assert values["fid_mnist"].title == "FID (MNIST)" and values["kid_mnist"].title == "KID (MNIST)"


def test_pr_mnist_is_the_digits_precision_recall_in_the_mnist_space(registry):
    # The computation is pr-digits' (tests/test_fidelity.py holds it to torch-fidelity); against
    # 10,000 reference points its k-NN radii cost ~10 s, so only its wiring is checked here
    metric = registry.get("metrics", "pr-mnist")
    assert metric.floor and metric.data_samples is data.mnist_samples and metric.default_for == ()
    assert metric.create.keywords["space"] is fidelity.mnist_space
    assert metric.create.func is fidelity.PrecisionRecall
    assert metric.applies(context(8)) is None and "at least 4 samples" in metric.applies(context(3))


# --- The floor -----------------------------------------------------------------------------

FACTORY = textwrap.dedent("""
    import torch


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x, c_noise):
            return self.b(torch.tanh(self.a(x) + c_noise.reshape(-1, 1, 1, 1)))


    def build(side=28):
        torch.manual_seed(0)
        return {"net": Net(), "shape": (1, side, side), "kind": "edm"}
""")


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """A random-init 28x28 network through `factory:` (a model with no data of its own)."""
    path = tmp_path_factory.mktemp("factory") / "tiny28.py"
    path.write_text(FACTORY)
    return f"factory:{path}:build"


def floor(registry, model, n: int, names=("fid-mnist", "kid-mnist")) -> dict:
    spec = CellSpec("test", Method(Spec("euler")), 2, n, 0, tuple((k, "1") for k in names))
    return data_floor(registry, spec, context(n, model), batch_size=100)


def test_a_model_without_data_gets_the_metrics_real_data_as_its_floor(registry, factory):
    n = 256
    bare = load_model(factory, "cpu", registry)
    assert bare.data_samples is None  # the model cannot draw its data
    real = floor(registry, bare, n)
    # The metrics' own real data: MNIST training images at n, drawn from seed 0
    direct = stream(registry, "fid-mnist", data.mnist_samples(n, 0), context(n, bare))["fid_mnist"]
    assert real["fid_mnist"]["value"] == pytest.approx(direct.value, rel=1e-9) and real["kid_mnist"]["n"] == n
    # Real digits score near the ideal, uniform noise far from it
    noise = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far = stream(registry, "fid-mnist", noise, context(n, bare))["fid_mnist"]
    print(f"\nFID (MNIST) at n={n}: real {real['fid_mnist']['value']:.3g} ± {real['fid_mnist']['std']:.2g}, "
          f"noise {far.value:.4g}")
    assert real["fid_mnist"]["value"] < 5 and far.value > 100 * real["fid_mnist"]["value"]
    # A model that draws its own data keeps it: the Gaussian's draws, not MNIST's
    own = gaussian(shape=(1, 28, 28))
    theirs = stream(registry, "fid-mnist", own.data_samples(n, 0), context(n, own))["fid_mnist"].value
    assert floor(registry, own, n, ["fid-mnist"])["fid_mnist"]["value"] == pytest.approx(theirs, rel=1e-9)
    assert theirs > 10 * real["fid_mnist"]["value"]


def test_mnist_metrics_refuse_images_of_another_size(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--model", "gaussian:1x32x32", "--samplers", "euler", "--nfe", "2",
            "--metrics", "kid-mnist", "--quiet", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "side 28k, the model's are 1x32x32" in err, err
    assert not (out / "results.jsonl").exists()


# --- The metrics a 1x28x28 model gets by default -----------------------------------------


def test_a_28x28_model_gets_fid_and_kid_mnist_by_default(registry, factory, tmp_path):
    small = load_model(factory + ";side=8", "cpu", registry)
    names, why = metric_set(registry, None, factory, small)
    assert names == ["reference"] and "no metric of its own: the error to a converged solve" in why
    model = load_model(factory, "cpu", registry)
    assert metric_set(registry, ["reference"], factory, model) == (["reference"], "named by --metrics")
    # End to end: `bench run` on the factory model, no --metrics
    out, n = tmp_path / "run", 64
    args = ["run", "--model", factory, "--samplers", "euler", "--nfe", "2", "--num-samples", str(n),
            "--batch-size", "32", "--report", "csv", "--quiet", "--out", str(out)]
    assert main(args) == 0
    (r,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert r["status"] == "ok" and list(r["spec"]["metrics"]) == ["fid-mnist", "kid-mnist"]
    assert "its images are 1x28x28" in r["metric_set"]
    fid, kid, fid_floor = r["metrics"]["fid_mnist"], r["metrics"]["kid_mnist"], r["floor"]["fid_mnist"]
    assert fid["n"] == kid["n"] == fid_floor["n"] == n and fid["title"] == "FID (MNIST)"
    # A random network's samples are far from MNIST; its floor is MNIST at n
    assert fid["value"] > 20 * fid_floor["value"] and kid["value"] > 10 * r["floor"]["kid_mnist"]["std"]
