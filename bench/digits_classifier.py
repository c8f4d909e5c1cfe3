"""The digits feature space: a small CNN classifier of scikit-learn's handwritten digits.

FID, KID and precision/recall need a feature space in which distances mean something;
Inception-v3 features of 8x8 digits would not (and its weights cannot be downloaded
here). This classifier, trained on a fixed stratified train split of the 1797 digits,
supplies that space: its 64-d penultimate layer, after the ReLU, so features are
non-negative like Inception's pool3 (and torch-fidelity's cubic KID kernel stays on
positive numbers, its fast path). It is
registered with torch-fidelity as the feature extractor `digits-classifier-v1`, so
torch-fidelity's own functions compute every metric from its features.

Input convention (torch-fidelity's): uint8 images [B, C, H, W] in 0..255. Colour is
averaged to grey, and sizes that are multiples of 8 (16x16 from a 2x upsample-guidance
modifier, say) are average-pooled to 8x8. Samples in [-1, 1] convert with `to_uint8`.

Training is deterministic on the CPU: `python -m bench.digits_classifier` rewrites the
shipped weights and reference features in bench/assets/ and prints the test accuracy;
`--evaluate` prints the shipped weights' test accuracy and the FID / KID of the held-out
digits and of noise against the train split.
Retraining changes the features, so new weights take a new versioned name.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_dataset, register_feature_extractor
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

NAME = "digits-classifier-v1"
DATASET = "sklearn-digits"
FEATURES = "64"
ASSETS = Path(__file__).parent / "assets"
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


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] to uint8 0..255, rounding as EDM does when it saves samples."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class DigitsDataset(Dataset):
    """The digits as uint8 [1, 8, 8] tensors: torch-fidelity's dataset `sklearn-digits`."""

    def __init__(self, indices: Tensor | None = None) -> None:
        images, _ = digits()
        self.images = to_uint8(images if indices is None else images[indices])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


# --- Network --------------------------------------------------------------------------


class DigitsNet(nn.Module):
    """Conv-conv-pool-conv-pool-linear-ReLU CNN on 8x8 grey images -> (features, logits)."""

    def __init__(self, width: int = 32, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
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
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return features, self.head(features)


def preprocess(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] (H = W a multiple of 8) -> float [B, 1, 8, 8] in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"{NAME} expects uint8 images [B, C, H, W], got {got}")
    h, w = images.shape[-2:]
    if h != w or h % 8:
        raise ValueError(f"{NAME} expects square images of side 8k, got {h}x{w}")
    # Grey, then 8x8 by averaging k x k blocks, then back to [-1, 1]
    x = images.float().mean(1, keepdim=True)
    x = F.avg_pool2d(x, h // 8) if h > 8 else x
    return x / 127.5 - 1


def load_net(path: Path = WEIGHTS) -> DigitsNet:
    """The shipped classifier, in eval mode."""
    net = DigitsNet()
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor `digits-classifier-v1`: features '64' and 'logits'."""

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)
        self.net = load_net(kwargs.get("feature_extractor_weights_path") or WEIGHTS)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURES, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return FEATURES

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features, logits = self.net(preprocess(images).to(next(self.net.parameters()).device))
        out = {FEATURES: features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


# Registered once per process, under versioned names
if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, DigitsFeatureExtractor)
if DATASET not in DATASETS_REGISTRY:
    register_dataset(DATASET, lambda root, download: DigitsDataset())


# --- Reference features -----------------------------------------------------------------


@torch.no_grad()
def extract(net: DigitsNet, images: Tensor, batch: int = 1024) -> Tensor:
    """Features '64' of uint8 images, in batches."""
    return torch.cat([net(preprocess(chunk))[0] for chunk in images.split(batch)])


def reference_features() -> Tensor:
    """The shipped features of all 1797 digits (the data every digits model is fitted to)."""
    return load_file(REFERENCE)["features"]


# --- Training -------------------------------------------------------------------------


def train(epochs: int = 60, batch: int = 64, lr: float = 2e-3, seed: int = TRAIN_SEED) -> DigitsNet:
    """Adam with a cosine learning rate on the train split, label smoothing 0.1; deterministic."""
    torch.manual_seed(seed)
    images, labels = digits()
    train_idx, _ = split()
    x, y = preprocess(to_uint8(images[train_idx])), labels[train_idx]
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        # One epoch over a seeded permutation
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(net(x[idx])[1], y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: DigitsNet, indices: Tensor) -> float:
    """Top-1 accuracy on the digits at `indices`."""
    images, labels = digits()
    logits = net(preprocess(to_uint8(images[indices])))[1]
    return float((logits.argmax(1) == labels[indices]).float().mean())


def evaluate() -> dict[str, float]:
    """The shipped classifier's test accuracy, and FID / KID (torch-fidelity, this feature
    space) of the held-out test split and of uniform noise against the train split."""
    import torch_fidelity

    train_idx, test_idx = split()
    noise = DigitsDataset(test_idx)
    noise.images = to_uint8(
        torch.rand(len(test_idx), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    out = {"test_accuracy": accuracy(load_net(), test_idx)}
    for name, data in (("test_split", DigitsDataset(test_idx)), ("noise", noise)):
        m = torch_fidelity.calculate_metrics(
            input1=data,
            input2=DigitsDataset(train_idx),
            feature_extractor=NAME,
            fid=True,
            kid=True,
            kid_subset_size=len(test_idx),
            cuda=False,
            cache=False,
            verbose=False,
            save_cpu_ram=True,
        )
        out[f"fid_{name}"] = m[torch_fidelity.KEY_METRIC_FID]
        out[f"kid_{name}"] = m[torch_fidelity.KEY_METRIC_KID_MEAN]
        out[f"kid_{name}_std"] = m[torch_fidelity.KEY_METRIC_KID_STD]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"train {NAME} and write its weights and reference features")
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the shipped weights")
    args = parser.parse_args(argv)
    if args.evaluate:
        print(json.dumps({k: round(v, 4) for k, v in evaluate().items()}))
        return 0
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    net = train(epochs=args.epochs)
    seconds = time.perf_counter() - start
    train_idx, test_idx = split()
    info = {
        "name": NAME,
        "train_accuracy": accuracy(net, train_idx),
        "test_accuracy": accuracy(net, test_idx),
        "train_size": len(train_idx),
        "test_size": len(test_idx),
        "epochs": args.epochs,
        "train_s": round(seconds, 1),
        "torch": torch.__version__,
    }
    # Weights, then the reference features of every digit through the saved weights
    args.out.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in info.items() if k != "train_s"}  # bytes stay reproducible
    save_file(net.state_dict(), args.out / WEIGHTS.name, metadata=metadata)
    reloaded = load_net(args.out / WEIGHTS.name)
    features = extract(reloaded, to_uint8(digits()[0])).contiguous()
    save_file({"features": features}, args.out / REFERENCE.name, metadata=metadata)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
