"""Skip-Tuning (Ma, Xue, Hu, Wang, Liu, Li, Ma, Kawaguchi, ICML 2024, "The Surprising
Effectiveness of Skip-Tuning in Diffusion Sampling") as a sampler-bench modifier.

Training-free: the decoder of a UNet concatenates encoder skip features h_k; skip-tuning
feeds rho_k h_k instead, with rho_k linear from rho_bottom at the innermost skip (k = 0)
to rho_top at the outermost (k = K - 1). The denoiser is the same single network call,
so it costs no NFE. The scaling lives in forward pre-hooks that exist only while the
wrapper calls the network, so the shared model is untouched for every other cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from bench import Denoiser, DenoiserWrapper
from bench.errors import NotApplicable, UsageError

from . import tuned
from .skips import SkipLayout, find_layout, scaled_skips, skip_factors

OPTIONS = {"rho_bottom": None, "rho_top": None}
REACHABLE = "the digits UNet, diffusers UNet2DModel, EDM SongUNet/DhariwalUNet"


class SkipTuned(DenoiserWrapper):
    """D(x, sigma) of `inner` with skip k of its UNet scaled by factors[k] (innermost first)."""

    def __init__(self, inner: Denoiser, layout: SkipLayout, factors: Sequence[float], applied: str) -> None:
        super().__init__(inner)
        self.layout, self.factors, self.applied = layout, list(factors), applied

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        with scaled_skips(self.layout, self.factors):
            return self.inner(x, sigma, **cond)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "skip_tuning": self.factors}


def layout_of(denoiser: Denoiser) -> SkipLayout:
    """The denoiser's UNet skips, or NotApplicable (a one-line reason) when it has none."""
    layout = find_layout(getattr(denoiser, "net", None))
    if layout is None:
        raise NotApplicable(
            f"skip-tuning is not applicable to model '{denoiser.spec or type(denoiser).__name__}': "
            f"it exposes no UNet whose skips can be reached ({REACHABLE})"
        )
    return layout


def tuned_factors(denoiser: Denoiser, cell: Mapping[str, Any]) -> tuple[float, float, str]:
    """(rho_bottom, rho_top, where from) tuned for this model, sampler, schedule and budget."""
    model, fp = denoiser.spec, tuned.fingerprint(denoiser.net)
    found = tuned.lookup(model, fp, cell["sampler"], cell["schedule"], cell["nfe"])
    if found is None:
        have = ", ".join(tuned.available(model, fp)) or "none"
        raise NotApplicable(
            f"skip-tuning has no factors tuned for {model} / {cell['sampler']}@{cell['schedule']} / "
            f"NFE {cell['nfe']} (tuned for these weights: {have}); give rho_bottom=..:rho_top=.. "
            f"or run `bench skip-tune --model {model} --samplers {cell['sampler']} --nfe {cell['nfe']}`"
        )
    entry, path = found
    source = f"tuned for {entry['sampler']} NFE {entry['nfe']}, {path.parent.name}/{path.name}"
    return float(entry["rho_bottom"]), float(entry["rho_top"]), source


def apply(
    denoiser: Denoiser,
    rho_bottom: float | None = None,
    rho_top: float | None = None,
    cell: Mapping[str, Any] | None = None,
) -> Denoiser:
    """The modifier: given factors (a missing one is 1), or else the tuned ones for this cell."""
    layout = layout_of(denoiser)
    if rho_bottom is None and rho_top is None:
        if cell is None:
            raise UsageError(
                "skip-tuning without rho_bottom/rho_top needs the cell it runs in; "
                "give rho_bottom=..:rho_top=.."
            )
        rho_bottom, rho_top, source = tuned_factors(denoiser, cell)
    else:
        rho_bottom = 1.0 if rho_bottom is None else float(rho_bottom)
        rho_top = 1.0 if rho_top is None else float(rho_top)
        source = "given"
    factors = skip_factors(layout.count, rho_bottom, rho_top)
    applied = (
        f"skip-tuning:rho_bottom={rho_bottom:g}:rho_top={rho_top:g} "
        f"({layout.count} skips of the {layout.kind}; {source})"
    )
    return SkipTuned(denoiser, layout, factors, applied)
