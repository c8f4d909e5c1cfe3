"""Text conditioning: prompt sets, fixed per sample, and classifier-free guidance.

Prompts. A file of one prompt per line; sample i of every cell takes prompt i mod n
(`prompt_rows`), so methods share their prompts as they share their noise. Without
`--prompts` a text model uses the set shipped in the package (bench/assets/prompts.txt,
32 varied prompts). The digest of a `--prompts` file is part of the run's identity:
another prompt set is another sweep.

Guidance. Classifier-free guidance (Ho & Salimans 2022) as a modifier, `cfg`, in the
sigma formulation x = x0 + sigma * eps:

    D_cfg(x, sigma) = D_u(x, sigma) + s [D_c(x, sigma) - D_u(x, sigma)],

D_c under the batch's conditioning (each sample's prompt), D_u under the model's
unconditional embedding (the empty prompt). For fixed x and sigma, D is affine in the
network's output (eps, v or flow velocity), so guiding D is guiding that output:
`cfg:scale=7.5` takes the steps of diffusers' pipelines at guidance_scale=7.5.

Both predictions come from one batched call on [x; x] with conditioning [uncond; cond]
(twice the batch), as diffusers makes it. The counter's rule (bench.nfe) counts a call on
k x the batch as 1 NFE of the budget and k - 1 more in `nfe_equiv`: a cell of budget N
with cfg records nfe_counted = N and nfe_equiv = 2N. Budgets compare steps; nfe_equiv is
the network's work.

What it needs of the model: `conditioning(n, unconditional=False) -> {keyword: tensor}`,
the network keywords of the current batch's n rows (the prompts `select` picked) or of the
unconditional embedding, which the model's forward accepts as `**cond`. A model without
it is unconditional, and cfg is not applicable there (the cell is infeasible, with why).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .contracts import Denoiser, DenoiserWrapper, Modifier
from .errors import NotApplicable, UsageError

DEFAULT_PROMPTS = Path(__file__).parent / "assets" / "prompts.txt"


def read_prompts(path: str | Path | None = None) -> tuple[str, ...]:
    """The non-blank lines of `path` (the packaged set when None), stripped, in order."""
    path = Path(path).expanduser() if path is not None else DEFAULT_PROMPTS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts: no such file '{path}'; give a text file with one prompt per line") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompts: cannot read '{path}' ({type(exc).__name__}); give a UTF-8 text file "
                         "with one prompt per line") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise UsageError(f"--prompts: '{path}' has no prompts; write one prompt per line")
    return prompts


def prompts_digest(prompts: tuple[str, ...]) -> str:
    """A short content hash of a prompt set (order matters: it decides each sample's prompt)."""
    return hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:16]


def prompt_rows(indices: Tensor, n: int) -> Tensor:
    """The prompt of each sample position: i mod n."""
    return torch.as_tensor(indices, dtype=torch.long) % n


# --- Classifier-free guidance ----------------------------------------------------------


OPTIONS = {"scale": 7.5}


class Guided(DenoiserWrapper):
    """D_u + s (D_c - D_u) from one call on the doubled batch (module docstring)."""

    def __init__(self, inner: Denoiser, scale: float) -> None:
        super().__init__(inner)
        self.scale, self.has_bottleneck = scale, False
        self.applied = (f"cfg:scale={scale:g} (one call on uncond and cond stacked, 2x the batch: "
                        "1 NFE of the budget, 2 in nfe_equiv)")

    def forward(self, x: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        # The batch's conditioning and the unconditional one, stacked as [uncond; cond]
        n = len(x)
        cond = self.inner.conditioning(n)
        uncond = self.inner.conditioning(n, unconditional=True)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        # One network call on the doubled batch, then the guided combination
        d_u, d_c = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return d_u + self.scale * (d_c - d_u)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "guidance": {"cfg": self.scale}}


def apply(denoiser: Denoiser, scale: float = 7.5) -> Denoiser:
    """The modifier: guidance scale s on a conditional model (s = 1 is plain conditional
    sampling at twice the work; s = 0 unconditional)."""
    if not math.isfinite(scale):
        raise UsageError(f"cfg: scale={scale} must be a finite number, e.g. cfg:scale=7.5")
    if not callable(getattr(denoiser, "conditioning", None)):
        name = denoiser.spec or type(denoiser).__name__
        raise NotApplicable(f"cfg is not applicable to model '{name}': it has no conditioning "
                            "(an unconditional model); drop cfg or load a text-conditional pipeline")
    return Guided(denoiser, float(scale))


MODIFIERS = (
    Modifier(
        "cfg",
        apply,
        "classifier-free guidance (Ho & Salimans 2022): D_u + scale (D_c - D_u) from one call on "
        "uncond and cond stacked, 2x the batch: 1 NFE of the budget, 2 in nfe_equiv; "
        "text-conditional models only",
        options=OPTIONS,
        target=True,  # the guided ODE is what a cfg cell solves: its reference is guided too
    ),
)
