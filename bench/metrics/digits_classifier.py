"""The digits feature space: a small CNN classifier of scikit-learn's handwritten digits.

FID, KID and precision/recall need a feature space in which distances mean something;
Inception-v3 features of 8x8 digits would not (and its weights cannot be downloaded
here). This classifier, trained on a fixed stratified train split of the 1797 digits,
supplies that space: its 64-d penultimate layer, after the ReLU, so features are
non-negative like Inception's pool3 (and torch-fidelity's cubic KID kernel stays on
positive numbers, its fast path). It is registered with torch-fidelity as the feature
extractor `digits-classifier-v1` (`bench.metrics.classifier`, the machinery it shares with the
MNIST feature space), so torch-fidelity's own functions compute every metric from its
features.

Input convention (torch-fidelity's): uint8 images [B, C, H, W] in 0..255. Colour is
averaged to grey, and sizes that are multiples of 8 (16x16 from a 2x upsample-guidance
modifier, say) are average-pooled to 8x8. Samples in [-1, 1] convert with `to_uint8`.

Training is deterministic on the CPU: `python -m bench.metrics.digits_classifier` rewrites the
shipped weights and reference features in bench/assets/ and prints the test accuracy;
`--evaluate` prints the shipped weights' test accuracy and the FID / KID of the held-out
digits and of noise against the train split.
Retraining changes the features, so new weights take a new versioned name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch_fidelity import register_dataset, register_feature_extractor
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from . import classifier
from .classifier import Images, to_uint8

NAME = "digits-classifier-v1"
DATASET = "sklearn-digits"
FEATURES = "64"
ASSETS = Path(__file__).parents[1] / "assets"
WEIGHTS = ASSETS / f"{NAME}.safetensors"
REFERENCE = ASSETS / f"{NAME}-reference.safetensors"
TEST_FRACTION, SPLIT_SEED, TRAIN_SEED = 0.25, 0, 0


# --- Data -----------------------------------------------------------------------------


def digits() -> tuple[Tensor, Tensor]:
    """All 1797 digits as float32 [N, 1, 8, 8] in [-1, 1] (grey level / 8 - 1) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    return images, torch.tensor(data.target, dtype=torch.long)


def split() -> tuple[Tensor, Tensor]:
    """Indices (train, test) of the fixed stratified split the classifier was trained on."""
    from sklearn.model_selection import train_test_split

    _, labels = digits()
    train, test = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=labels.numpy(),
    )
    return torch.as_tensor(train), torch.as_tensor(test)


class DigitsDataset(Images):
    """The digits as uint8 [1, 8, 8] tensors: torch-fidelity's dataset `sklearn-digits`."""

    def __init__(self, indices: Tensor | None = None) -> None:
        images, _ = digits()
        super().__init__(to_uint8(images if indices is None else images[indices]))


# --- Network --------------------------------------------------------------------------


class DigitsNet(classifier.Classifier):
    """Conv-conv-pool-conv-pool-linear-ReLU CNN on 8x8 grey images -> (features, logits)."""

    def __init__(self, width: int = 32, dim: int = 64, classes: int = 10) -> None:
        body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, dim),
            nn.ReLU(),
        )
        super().__init__(body, dim, classes)


def preprocess(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] (H = W a multiple of 8) -> float [B, 1, 8, 8] in [-1, 1]."""
    return classifier.preprocess(images, 8, NAME)


def load_net(path: Path | None = None) -> DigitsNet:
    """The shipped classifier (or the weights at `path`), in eval mode."""
    return classifier.load(DigitsNet(), path or WEIGHTS)


class DigitsFeatureExtractor(classifier.ClassifierFeatures):
    """torch-fidelity feature extractor `digits-classifier-v1`: features '64' and 'logits'."""

    features, side, load_net = FEATURES, 8, staticmethod(load_net)


# Registered once per process, under versioned names
if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, DigitsFeatureExtractor)
if DATASET not in DATASETS_REGISTRY:
    register_dataset(DATASET, lambda root, download: DigitsDataset())


# --- Reference features -----------------------------------------------------------------


def extract(net: DigitsNet, images: Tensor) -> Tensor:
    """Features '64' of uint8 images."""
    return classifier.extract(net, preprocess(images))[0]


def reference_features() -> Tensor:
    """The shipped features of all 1797 digits (the data every digits model is fitted to)."""
    return load_file(REFERENCE)["features"]


# --- Training -------------------------------------------------------------------------


def train(epochs: int = 60, batch: int = 64, lr: float = 2e-3, seed: int = TRAIN_SEED) -> DigitsNet:
    """Adam with a cosine learning rate on the train split, label smoothing 0.1
    (`bench.metrics.classifier.fit`); deterministic."""
    torch.manual_seed(seed)
    images, labels = digits()
    train_idx, _ = split()
    x, y = preprocess(to_uint8(images[train_idx])), labels[train_idx]
    return classifier.fit(DigitsNet(), x, y, epochs, batch, lr, seed)


def accuracy(net: DigitsNet, indices: Tensor) -> float:
    """Top-1 accuracy on the digits at `indices`."""
    images, labels = digits()
    logits = classifier.extract(net, preprocess(to_uint8(images[indices])))[1]
    return float((logits.argmax(1) == labels[indices]).float().mean())


def evaluate() -> dict[str, float]:
    """The shipped classifier's test accuracy, and FID / KID (torch-fidelity, this feature
    space) of the held-out test split and of uniform noise against the train split."""
    train_idx, test_idx = split()
    gen = torch.Generator().manual_seed(0)
    noise = Images(to_uint8(torch.rand(len(test_idx), 1, 8, 8, generator=gen) * 2 - 1))
    out = {"test_accuracy": accuracy(load_net(), test_idx)}
    for name, data in (("test_split", DigitsDataset(test_idx)), ("noise", noise)):
        reference = DigitsDataset(train_idx)
        out.update(classifier.fidelity(name, data, reference, NAME, kid_subset_size=len(test_idx)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Train and write the assets, or `--evaluate` the shipped ones (`bench.metrics.classifier.command`)."""

    def describe(net: DigitsNet) -> dict:
        train_idx, test_idx = split()
        return {"train_accuracy": accuracy(net, train_idx), "test_accuracy": accuracy(net, test_idx),
                "train_size": len(train_idx), "test_size": len(test_idx)}

    return classifier.command(argv, sys.modules[__name__], 60, describe, lambda: to_uint8(digits()[0]))


if __name__ == "__main__":
    raise SystemExit(main())
