"""Training of the embedded UNets (`bench train-digits`, `bench train-mnist`).

Two objectives on images y in [-1, 1]:

- `edm`: EDM's loss (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models", section 5): lambda(sigma) |D(y + sigma n, sigma) - y|^2 with
  lambda = (sigma^2 + sd^2) / (sigma sd)^2 and ln(sigma) ~ N(P_mean, P_std^2), through the
  EDM preconditioning of `bench.adapters.Preconditioned`;
- `flow`: rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1 - t) y + t n,
  |v_theta(x_t, t) - (n - y)|^2, t = sigmoid(m + s z) (SD3's logit-normal).

Adam with a linear warm-up and a cosine decay of the learning rate; the exponential moving
average of the weights is what ships. Every random number comes from one generator seeded
with the recipe's seed, the weights are initialised under `torch.manual_seed(seed)`, and
the commands train on one thread with deterministic algorithms, so a retrain writes the
same bytes within one torch build.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import Flow, Preconditioned
from .errors import ModelLoadError, UsageError

OBJECTIVES = ("edm", "flow")
FLOW_FIELDS = ("objective", "logit_mean", "logit_std", "time_scale")  # absent from EDM metadata


@dataclass(frozen=True)
class Recipe:
    """The training recipe: EDM's noise levels and loss (or rectified flow's), Adam with
    warm-up and cosine decay, an EMA of half-life `ema_halflife` steps."""

    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 200
    ema_halflife: int = 200
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0
    # The rectified-flow objective: t from logit-normal(logit_mean, logit_std) as SD3;
    # the network sees t * time_scale
    objective: str = "edm"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_scale: float = 1000.0


def edm_loss(denoiser: Preconditioned, y: Tensor, n: Tensor, sigma: Tensor) -> Tensor:
    """EDM's loss: lambda(sigma) |D(y + sigma n, sigma) - y|^2, lambda = (s^2 + sd^2) / (s sd)^2."""
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    d_y = denoiser(y + sigma.reshape(-1, 1, 1, 1) * n, sigma)
    return (weight.reshape(-1, 1, 1, 1) * (d_y - y) ** 2).mean()


def flow_loss(net: nn.Module, y: Tensor, n: Tensor, t: Tensor, time_scale: float) -> Tensor:
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1 - t) y + t n,
    loss |v_theta(x_t, t) - (n - y)|^2."""
    s = t.reshape(-1, 1, 1, 1)
    v = net((1 - s) * y + s * n, t * time_scale)
    return ((v - (n - y)) ** 2).mean()


def learning_rate(config: Recipe, step: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to zero."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: Recipe, data: Tensor, build: Callable[[], nn.Module],
          log: Callable[[str], None] | None = None, log_every: int = 500) -> tuple[nn.Module, dict[str, Any]]:
    """Train `build()` on the images `data` [N, C, H, W]; returns the EMA network and a summary.

    Batches are drawn with replacement; `objective="flow"` draws t where EDM draws sigma
    (the same number of random draws per step) and trains the velocity.
    """
    if config.objective not in OBJECTIVES:
        raise UsageError(f"--objective: '{config.objective}' is not one of {', '.join(OBJECTIVES)}")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = build()
    ema = build().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    denoiser = Preconditioned(net, "edm", tuple(data.shape[1:]), sigma_data=config.sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    ema_beta = 0.5 ** (1 / config.ema_halflife)
    losses = []
    for step in range(config.steps):
        # A batch of images, their noise and the normal draws of their noise levels (sigma or t)
        y = data[torch.randint(len(data), (config.batch_size,), generator=gen)]
        n = torch.randn(y.shape, generator=gen)
        z = torch.randn(len(y), generator=gen)
        # One Adam step at the scheduled learning rate
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step)
        if config.objective == "flow":
            t = torch.sigmoid(config.logit_mean + config.logit_std * z)
            loss = flow_loss(net, y, n, t, config.time_scale)
        else:
            loss = edm_loss(denoiser, y, n, (config.p_mean + config.p_std * z).exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # The exponential moving average of the weights
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.lerp_(p, 1 - ema_beta)
        losses.append(loss.item())
        if log and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log(f"step {step + 1}/{config.steps}  loss {sum(recent) / len(recent):.4f}")
    tail = losses[-min(len(losses), 200) :]
    return ema.eval(), {"final_loss": sum(tail) / len(tail), "final_loss_steps": len(tail)}


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels on one thread (the reduction order then does not depend on the
    machine's core count), restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


# --- Weights --------------------------------------------------------------------------


def save_weights(path: Path, key: str, net: nn.Module, config: Recipe, summary: dict[str, Any]) -> None:
    """safetensors with the network and training configuration in its metadata.

    The metadata is one JSON string under a single key: safetensors writes several keys
    in no fixed order, which would make the bytes of two identical trainings differ. An
    EDM recipe's metadata leaves out the flow objective's fields.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    train_meta = asdict(config)
    if config.objective == "edm":
        train_meta = {k: v for k, v in train_meta.items() if k not in FLOW_FIELDS}
    meta = {"unet": asdict(net.config), "train": train_meta, "summary": summary, "torch": torch.__version__}
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={key: json.dumps(meta, sort_keys=True)})


def load_unet(path: Path, key: str, command: str, unet: Callable[..., nn.Module],
              config: Callable[..., Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The network `unet(config(**metadata))` with the weights of a file written by
    `save_weights` under `key`, and its training recipe (a dict)."""
    meta, tensors = read_weights(path, key, command)
    net = unet(config(**{**meta["unet"], "channels": tuple(meta["unet"]["channels"])}))
    net.load_state_dict(tensors)
    return net.eval().requires_grad_(False), meta["train"]


def as_model(net: nn.Module, recipe: dict[str, Any], objective: str, family: str, arg: str | None,
             shape: tuple[int, int, int], sigmas: tuple[float, float], data_samples: Callable[..., Tensor]):
    """A trained UNet as the model source `family` (objective `edm`: EDM preconditioning,
    bottleneck exposed) or `family-flow` (`flow`: bench.adapters.Flow, velocity, the recipe's
    time scale), over `sigmas`; real data for the metrics' floor from `data_samples`. A file
    trained with the other objective is a ModelLoadError naming the source that loads it."""
    trained = recipe.get("objective", "edm")
    if trained != objective:
        other = f"{family}-flow" if trained == "flow" else family
        how = "the EDM objective" if trained == "edm" else f"--objective {trained}"
        raise ModelLoadError(f"'{arg}' was trained with {how}; load it as {other}:{arg}")
    s_min, s_max = sigmas
    if objective == "flow":
        model = Flow(net, shape, prediction="velocity", net=net, time_scale=recipe["time_scale"],
                     t_min=s_min / (1 + s_min), t_max=s_max / (1 + s_max), sigma_data=recipe["sigma_data"])
    else:
        model = Preconditioned(net, "edm", shape, sigma_data=recipe["sigma_data"], sigma_min=s_min,
                               sigma_max=s_max, has_bottleneck=True)
    model.data_samples = data_samples
    return model


def read_weights(path: Path, key: str, command: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The metadata under `key` and the tensors of a file written by `save_weights`;
    a missing file or one without that metadata is a ModelLoadError naming `command`."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ModelLoadError(f"weights '{path}' not found; write them with `bench {command} --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(key, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # not a safetensors file at all
        raise ModelLoadError(f"'{path}' is not a safetensors weights file ({type(exc).__name__}); "
                             f"write it with `bench {command}`") from None
    if meta is None:
        raise ModelLoadError(f"'{path}' has no {key} metadata; write it with `bench {command}`")
    return meta, tensors


# --- Command line ---------------------------------------------------------------------


def positive(args, *names: str) -> None:
    """UsageError unless each named option is a positive integer."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}: {value}; give a positive integer")


def channel_list(text: str, levels: int = 2) -> tuple[int, ...]:
    """`--channels 32,64` -> (32, 64): `levels` or more comma-separated widths >= 4."""
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise UsageError(f"--channels: '{text}' is not a comma list of integers") from None
    if len(channels) < levels or min(channels) < 4:
        raise UsageError(f"--channels: '{text}'; give {levels} or more levels of width >= 4, e.g. 32,64")
    return channels


def learning_rate_option(lr: float) -> float:
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr: {lr} is not a positive finite learning rate, e.g. 2e-3")
    return lr


def run_training(config: Recipe, data: Callable[[], Tensor], build: Callable[[], nn.Module],
                 out: Path, key: str, quiet: bool) -> int:
    """A training command's work: check `out` is writable, train deterministically on one
    thread, write the weights and print a JSON summary line."""
    from .files import writable_file

    writable_file(out, "--out")  # before the training, not after it
    log = None if quiet else partial(print, flush=True)
    images = data()
    with deterministic():
        start, cpu_start = time.perf_counter(), time.process_time()
        net, summary = train(config, images, build, log)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    save_weights(out, key, net, config, summary)
    parameters = sum(p.numel() for p in net.parameters())
    print(json.dumps({"out": str(out), **summary, "train_s": round(seconds, 1),
                      "cpu_s": round(cpu_seconds, 1), "parameters": parameters}))
    return 0
