"""A small image classifier as a torch-fidelity feature space: what the digits and MNIST
feature spaces (`bench.metrics.digits_classifier`, `bench.metrics.mnist_classifier`) share.

A feature space is a CNN trained to classify the data set's digits; its penultimate layer,
after a ReLU, gives the features (non-negative like Inception's pool3), and a subclass of
`ClassifierFeatures` registers it with torch-fidelity under a versioned name, so
torch-fidelity's own functions compute every metric from its features.

Input convention (torch-fidelity's): uint8 images [B, C, H, W] in 0..255. Colour is
averaged to grey, and square sizes that are multiples of the network's side are
average-pooled to it (2x from an upsample-guidance modifier, say). Samples in [-1, 1]
convert with `to_uint8`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] to uint8 0..255, rounding as EDM does when it saves samples."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class Images(Dataset):
    """uint8 images [N, C, H, W] (`images`, replaceable) as a torch-fidelity input."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class Classifier(nn.Module):
    """A convolutional `body` ending in a Linear + ReLU `dim` wide (the features) and a
    dropout-linear head -> (features, logits)."""

    def __init__(self, body: nn.Sequential, dim: int, classes: int = 10) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return features, self.head(features)


def load(net: nn.Module, path: Path) -> nn.Module:
    """`net` with the weights of a safetensors file, in eval mode."""
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


def preprocess(images: Tensor, side: int, name: str) -> Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3, H = W a multiple of `side`) -> float [B, 1, side, side]
    in [-1, 1]; `name` is the network's, for the error message."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"{name} expects uint8 grey or RGB images [B, C, H, W], got {got}")
    h, w = images.shape[-2:]
    if h != w or h % side:
        raise ValueError(f"{name} expects square images of side {side}k, got {h}x{w}")
    # Grey, then side x side by averaging k x k blocks, then back to [-1, 1]
    x = images.float().mean(1, keepdim=True)
    x = F.avg_pool2d(x, h // side) if h > side else x
    return x / 127.5 - 1


class ClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity feature extractor on a shipped classifier (`net(x) -> (features,
    logits)`): subclasses set `features` (the feature layer's name), `side` (the network's
    image side) and `load_net(path | None)` (None: the shipped weights)."""

    features: str
    side: int

    @staticmethod
    def load_net(path: Path | None) -> nn.Module:
        raise NotImplementedError

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)
        self.net = self.load_net(kwargs.get("feature_extractor_weights_path"))

    @classmethod
    def get_provided_features_list(cls) -> tuple[str, ...]:
        return (cls.features, "logits")

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric: str) -> str:
        return cls.features

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @classmethod
    def get_dummy_input_for_compile(cls) -> Tensor:
        return torch.zeros(1, 1, cls.side, cls.side, dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = preprocess(images, self.side, self.name).to(next(self.net.parameters()).device)
        features, logits = self.net(x)
        out = {self.features: features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


@torch.no_grad()
def extract(net: nn.Module, x: Tensor, batch: int = 1024) -> tuple[Tensor, Tensor]:
    """(features, logits) of preprocessed images `x`, in batches."""
    parts = [net(chunk) for chunk in x.split(batch)]
    return torch.cat([f for f, _ in parts]), torch.cat([logits for _, logits in parts])


def fit(net: nn.Module, x: Tensor, y: Tensor, epochs: int, batch: int, lr: float, seed: int,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None) -> nn.Module:
    """Adam (weight decay 1e-4) with a cosine learning rate, cross-entropy with label
    smoothing 0.1, on preprocessed images `x` and labels `y`; batches in a seeded order
    (and `augment(batch, generator)`, if given): deterministic on the CPU."""
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        # One epoch over a seeded permutation
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            xb = augment(x[idx], gen) if augment else x[idx]
            loss = F.cross_entropy(net(xb)[1], y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def fidelity(name: str, images: Dataset, reference: Dataset | str, extractor: str,
             **kwargs) -> dict[str, float]:
    """FID and KID (mean and std over subsets) of `images` against `reference` by
    torch-fidelity's calculate_metrics in the feature space `extractor`, on the CPU,
    uncached: {fid_<name>, kid_<name>, kid_<name>_std}."""
    import torch_fidelity

    m = torch_fidelity.calculate_metrics(input1=images, input2=reference, feature_extractor=extractor,
                                         fid=True, kid=True, cuda=False, cache=False, verbose=False,
                                         save_cpu_ram=True, **kwargs)
    return {f"fid_{name}": m[torch_fidelity.KEY_METRIC_FID],
            f"kid_{name}": m[torch_fidelity.KEY_METRIC_KID_MEAN],
            f"kid_{name}_std": m[torch_fidelity.KEY_METRIC_KID_STD]}


def command(argv: list[str] | None, space: ModuleType, epochs: int,
            describe: Callable[[nn.Module], dict], reference_images: Callable[[], Tensor]) -> int:
    """`python -m bench.<space>`: train the classifier of module `space` (its NAME, ASSETS,
    WEIGHTS, REFERENCE, train(epochs), load_net, extract, evaluate) on one thread with
    deterministic algorithms, then write its weights and the features of
    `reference_images()` through the saved weights into --out, and print `describe(net)`
    with the training time; `--evaluate` prints `space.evaluate()` instead."""
    what = f"train {space.NAME} and write its weights and reference features"
    parser = argparse.ArgumentParser(description=what)
    parser.add_argument("--out", type=Path, default=space.ASSETS)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the shipped weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.evaluate:
        print(json.dumps({k: round(v, 4) for k, v in space.evaluate().items()}))
        return 0
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    net = space.train(epochs=args.epochs)
    seconds = time.perf_counter() - start
    info = {"name": space.NAME, **describe(net), "epochs": args.epochs, "torch": torch.__version__}
    # One metadata key (safetensors orders several at random), no time: the bytes are reproducible
    metadata = {"bench": json.dumps(info, sort_keys=True)}
    args.out.mkdir(parents=True, exist_ok=True)
    weights, reference = args.out / space.WEIGHTS.name, args.out / space.REFERENCE.name
    save_file(net.state_dict(), weights, metadata=metadata)
    # The reference features through the weights as saved
    features = space.extract(space.load_net(weights), reference_images()).contiguous()
    save_file({"features": features}, reference, metadata=metadata)
    print(json.dumps({**info, "train_s": round(seconds, 1)}))
    return 0
