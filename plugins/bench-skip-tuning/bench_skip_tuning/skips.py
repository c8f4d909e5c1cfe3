"""Where a UNet's decoder concatenates its encoder skips, for the layouts sampler-bench loads.

A `SkipSite` is a decoder module whose forward receives one or more encoder skip
features; `scale(args, kwargs, factors)` returns its inputs with those skips multiplied
by `factors` (innermost skip first). `find_sites(net)` lists the sites of the first
recognised UNet inside `net`, innermost first, so that skip k of K (k = 0 innermost)
is the k-th skip the decoder consumes:

- the embedded digits UNet (`bench.models.digits.UNet`): `skip_names` (outermost first) and one
  decoder block `up[name]` per skip, called as `block(h, skip, emb)`;
- diffusers `UNet2DModel` / `UNet2DConditionModel`: each of `up_blocks` receives
  `res_hidden_states_tuple` and its resnets pop and concatenate from the end;
- EDM's `SongUNet` (DDPM++ / NCSN++) and `DhariwalUNet` (ADM): `enc` and `dec`
  ModuleDicts; the UNet's forward concatenates `skips.pop()` onto the input of every
  decoder block whose `in_channels` differs from the running channel count (blocks whose
  name contains `aux` never take a skip), so the sites follow from the channel counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

Args = tuple[Any, ...]
Kwargs = dict[str, Any]
ScaleFn = Callable[[Args, Kwargs, Sequence[float]], tuple[Args, Kwargs]]

DIFFUSERS_UNETS = ("UNet2DModel", "UNet2DConditionModel")


@dataclass(frozen=True)
class SkipSite:
    """A decoder module that concatenates `count` encoder skips; `scale` rescales them."""

    module: nn.Module
    name: str
    count: int
    scale: ScaleFn


@dataclass(frozen=True)
class SkipLayout:
    """The skip sites of one UNet, innermost first, and what kind of UNet it is."""

    kind: str
    path: str
    sites: tuple[SkipSite, ...]

    @property
    def count(self) -> int:
        return sum(site.count for site in self.sites)


# --- Rescaling one argument -----------------------------------------------------------


def _replace(
    args: Args, kwargs: Kwargs, index: int, key: str, fn: Callable[[Any], Any]
) -> tuple[Args, Kwargs]:
    """(args, kwargs) with the argument at position `index` (or keyword `key`) mapped by fn."""
    if key in kwargs:
        return args, {**kwargs, key: fn(kwargs[key])}
    return (*args[:index], fn(args[index]), *args[index + 1 :]), kwargs


def scale_argument(index: int, key: str, args: Args, kwargs: Kwargs, factors: Sequence[float]):
    """The digits UpBlock: its `skip` argument times the one factor."""
    return _replace(args, kwargs, index, key, lambda skip: skip * factors[0])


def scale_tuple(index: int, key: str, args: Args, kwargs: Kwargs, factors: Sequence[float]):
    """A diffusers up block: the resnets consume the tuple from its end, innermost first."""

    def fn(skips: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        n = len(skips)
        return tuple(s * factors[n - 1 - i] for i, s in enumerate(skips))

    return _replace(args, kwargs, index, key, fn)


def scale_trailing(channels: int, args: Args, kwargs: Kwargs, factors: Sequence[float]):
    """An EDM decoder block: its input is cat([h, skip]); the last `channels` are the skip."""

    def fn(x: Tensor) -> Tensor:
        return torch.cat([x[:, :-channels], x[:, -channels:] * factors[0]], dim=1)

    return _replace(args, kwargs, 0, "x", fn)


# --- Layouts --------------------------------------------------------------------------


def digits_sites(net: nn.Module) -> list[SkipSite] | None:
    """bench.models.digits.UNet: decoder block `up[name]` takes skip `name`; innermost last in skip_names."""
    names, up = getattr(net, "skip_names", None), getattr(net, "up", None)
    if not names or not isinstance(up, nn.ModuleDict) or not all(n in up for n in names):
        return None
    return [SkipSite(up[n], f"up.{n}", 1, partial(scale_argument, 1, "skip")) for n in reversed(names)]


def diffusers_sites(net: nn.Module) -> list[SkipSite] | None:
    """diffusers UNet2DModel / UNet2DConditionModel: up blocks in call order, innermost first."""
    is_unet = any(
        c.__name__ in DIFFUSERS_UNETS and c.__module__.startswith("diffusers") for c in type(net).__mro__
    )
    if not is_unet or not isinstance(getattr(net, "up_blocks", None), nn.ModuleList):
        return None
    return [
        SkipSite(
            block, f"up_blocks.{i}", len(block.resnets), partial(scale_tuple, 1, "res_hidden_states_tuple")
        )
        for i, block in enumerate(net.up_blocks)
    ]


def edm_sites(net: nn.Module) -> list[SkipSite] | None:
    """SongUNet / DhariwalUNet: replay the forward's channel bookkeeping on enc and dec."""
    enc, dec = getattr(net, "enc", None), getattr(net, "dec", None)
    if not isinstance(enc, nn.ModuleDict) or not isinstance(dec, nn.ModuleDict):
        return None
    # Encoder: every block whose name has no 'aux' pushes its output as a skip
    skips = [block.out_channels for name, block in enc.items() if "aux" not in name]
    channels = skips[-1] if skips else None
    sites = []
    # Decoder: a block whose in_channels differ from the running count takes skips.pop()
    for name, block in dec.items():
        if "aux" in name:
            continue
        if channels != block.in_channels:
            if not skips or channels + skips[-1] != block.in_channels:
                return None  # not the layout this replay assumes
            width = skips.pop()
            sites.append(SkipSite(block, f"dec.{name}", 1, partial(scale_trailing, width)))
        channels = block.out_channels
    return sites


LAYOUTS: tuple[tuple[str, Callable[[nn.Module], list[SkipSite] | None]], ...] = (
    ("digits-unet", digits_sites),
    ("diffusers-unet", diffusers_sites),
    ("edm-unet", edm_sites),
)


def find_layout(net: nn.Module | None) -> SkipLayout | None:
    """The skip layout of the outermost recognised UNet inside `net`, or None."""
    if net is None:
        return None
    for path, module in net.named_modules():
        for kind, sites_of in LAYOUTS:
            sites = sites_of(module)
            if sites:
                return SkipLayout(kind, path, tuple(sites))
    return None


# --- Factors and hooks ------------------------------------------------------------------


def skip_factors(count: int, rho_bottom: float, rho_top: float) -> list[float]:
    """rho_k linear from rho_bottom (k = 0, innermost) to rho_top (k = count - 1, outermost)."""
    if count == 1:
        return [float(rho_bottom)]
    return [rho_bottom + (rho_top - rho_bottom) * k / (count - 1) for k in range(count)]


def _pre_hook(site: SkipSite, factors: Sequence[float], module: nn.Module, args: Args, kwargs: Kwargs):
    return site.scale(args, kwargs, factors)


@contextmanager
def scaled_skips(layout: SkipLayout, factors: Sequence[float]) -> Iterator[None]:
    """Within the block, every skip k of `layout` is multiplied by factors[k]; the hooks
    are removed on exit, whatever happens, so the network is left as it was."""
    handles = []
    try:
        offset = 0
        for site in layout.sites:
            mine = list(factors[offset : offset + site.count])
            offset += site.count
            hook = partial(_pre_hook, site, mine)
            handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
