"""Skip-tuning reaches the skips of every supported UNet layout, and only while it runs.

For each layout, forward hooks of the test record the encoder features the decoder will
concatenate, and the decoder's concatenated inputs as the network itself built them; the
skip part of concatenation k must be rho_k times encoder feature k (k = 0 innermost),
the rest untouched. Networks: the embedded digits UNet (shipped weights), a diffusers
UNet2DModel saved with save_pretrained and loaded through `diffusers:DIR`, and a random
network in EDM's SongUNet layout (`enc`/`dec` ModuleDicts, skips concatenated in the
UNet's forward, aux blocks) inside an EDMPrecond-style wrapper.
"""

from __future__ import annotations

import pytest
import torch
from bench_skip_tuning.modifier import apply
from bench_skip_tuning.skips import find_layout, skip_factors
from torch import nn
from torch.nn import functional as F

from bench import CountingDenoiser, load_model
from bench.errors import NotApplicable
from bench.testing import EDMNetwork, load_registry, single_threaded

CPU = torch.device("cpu")
RHO_BOTTOM, RHO_TOP = 0.6, 1.3


@pytest.fixture(scope="module")
def registry():
    return load_registry()


# --- A network in EDM's SongUNet layout ---------------------------------------------------


class Block(nn.Module):
    """A UNetBlock stand-in: GroupNorm first (as EDM's), optional 2x down/up, 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, emb: int = 8, resample: str = "") -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resample = in_channels, out_channels, resample
        self.norm0 = nn.GroupNorm(2, in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0)
        h = self.conv0(F.silu(self.norm0(x))) + self.affine(emb)[:, :, None, None]
        return (F.silu(h) + self.skip(x)) / 2**0.5


class Conv(nn.Conv2d):
    """EDM's Conv2d keeps in_channels / out_channels like torch's."""


class SongStyleUNet(nn.Module):
    """8x8 -> 4x4 and back in SongUNet's layout and forward (skips pushed by every non-aux
    encoder block, popped where a decoder block's in_channels differ), with NCSN++'s
    residual aux encoder path and the aux output head."""

    def __init__(self, c: int = 4, emb: int = 8) -> None:
        super().__init__()
        self.map = nn.Linear(1, emb)
        self.enc = nn.ModuleDict(
            {
                "8x8_conv": Conv(1, c, 3, padding=1),
                "8x8_block0": Block(c, c),
                "4x4_down": Block(c, c, resample="down"),
                "4x4_aux_residual": Conv(1, c, 1),
                "4x4_block0": Block(c, 2 * c),
            }
        )
        self.dec = nn.ModuleDict(
            {
                "4x4_in0": Block(2 * c, 2 * c),
                "4x4_in1": Block(2 * c, 2 * c),
                "4x4_block0": Block(4 * c, 2 * c),
                "4x4_block1": Block(3 * c, 2 * c),
                "8x8_up": Block(2 * c, 2 * c, resample="up"),
                "8x8_block0": Block(3 * c, c),
                "8x8_block1": Block(2 * c, c),
                "8x8_aux_norm": nn.GroupNorm(2, c),
                "8x8_aux_conv": Conv(c, 1, 3, padding=1),
            }
        )

    def forward(self, x, noise_labels, class_labels=None):
        emb = F.silu(self.map(noise_labels.reshape(-1, 1)))
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_residual" in name:
                x = skips[-1] = (x + block(F.avg_pool2d(aux, 2))) / 2**0.5
            else:
                x = block(x, emb) if isinstance(block, Block) else block(x)
                skips.append(x)
        out = None
        for name, block in self.dec.items():
            if "aux_norm" in name:
                out = block(x)
            elif "aux_conv" in name:
                out = block(F.silu(out))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class Precond(nn.Module):
    """EDMPrecond's interface around the UNet (`model`), as EDM pickles hold it."""

    img_resolution, img_channels, label_dim, sigma_data = 8, 1, 0, 0.5

    def __init__(self) -> None:
        super().__init__()
        self.model = SongStyleUNet()

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s * self.sigma_data / (s**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + s**2).sqrt()
        return c_skip * x + c_out * self.model(c_in * x, sigma.log() / 4)


# --- Recording what the decoder concatenates ------------------------------------------------


def record(modules, pre: bool, store: list, pick=lambda value: value):
    """Hooks appending each call's input (pre) or output to `store`; returns the handles."""
    if pre:
        return [m.register_forward_pre_hook(lambda m, a: store.append(pick(a[0]))) for m in modules]
    return [m.register_forward_hook(lambda m, a, out: store.append(pick(out))) for m in modules]


def check_concatenations(denoiser, encoder, decoder, x, sigma):
    """Run the tuned denoiser; each decoder input's trailing channels = rho_k x skip k."""
    features, inputs = [], []
    handles = encoder(features) + decoder(inputs)
    try:
        tuned = apply(CountingDenoiser(denoiser), rho_bottom=RHO_BOTTOM, rho_top=RHO_TOP)
        with torch.no_grad():
            tuned(x, sigma)
    finally:
        for h in handles:
            h.remove()
    features = features[::-1]  # the decoder pops the last-pushed (innermost) skip first
    factors = skip_factors(len(inputs), RHO_BOTTOM, RHO_TOP)
    assert len(features) == len(inputs) == tuned.layout.count
    for k, (skip, cat) in enumerate(zip(features, inputs, strict=True)):
        width = skip.shape[1]
        assert torch.allclose(cat[:, -width:], factors[k] * skip, atol=1e-6), f"skip {k}"
    return tuned


def check_left_intact(denoiser, tuned, x, sigma):
    """Factors 1 reproduce the network bit for bit; other factors change it only while the
    wrapper runs: afterwards the plain network gives what it gave before, with no hooks left."""
    with torch.no_grad():
        before = denoiser(x, sigma)
        ones = apply(CountingDenoiser(denoiser), rho_bottom=1.0, rho_top=1.0)
        assert torch.equal(ones(x, sigma), before)
        assert not torch.allclose(tuned(x, sigma), before, atol=1e-4)
        assert torch.equal(denoiser(x, sigma), before)
    assert not any(m._forward_pre_hooks for m in denoiser.modules())


# --- The layouts ------------------------------------------------------------------------------


@single_threaded
def test_digits_unet(registry):
    denoiser = load_model("digits", CPU, registry=registry)
    net = denoiser.net
    assert find_layout(net).kind == "digits-unet"
    x, sigma = torch.randn(3, 1, 8, 8) * 2, torch.full((3,), 2.0)

    def encoder(store):  # encoder level i outputs skip_names[i], outermost first
        return record(net.down, pre=False, store=store)

    def decoder(store):  # each UpBlock's merge conv sees cat([upsampled h, skip])
        return record([net.up[n].merge for n in reversed(net.skip_names)], pre=True, store=store)

    tuned = check_concatenations(denoiser, encoder, decoder, x, sigma)
    check_left_intact(denoiser, tuned, x, sigma)


@single_threaded
def test_diffusers_unet2dmodel(registry, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(1)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    unet.save_pretrained(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path)
    denoiser = load_model(f"diffusers:{tmp_path}", CPU, registry=registry)
    net = denoiser.net
    assert find_layout(net).kind == "diffusers-unet"
    x, sigma = torch.randn(2, 1, 8, 8) * 3, torch.full((2,), 3.0)

    def encoder(store):  # down_block_res_samples: conv_in, then each down block's tuple
        return record([net.conv_in], pre=False, store=store) + [
            b.register_forward_hook(lambda m, a, out: store.extend(out[1])) for b in net.down_blocks
        ]

    def decoder(store):  # every up-block resnet sees cat([hidden, res_hidden])
        return record([r for b in net.up_blocks for r in b.resnets], pre=True, store=store)

    tuned = check_concatenations(denoiser, encoder, decoder, x, sigma)
    assert tuned.layout.count == 4  # conv_in, resnet + downsampler of block 0, resnet of block 1
    check_left_intact(denoiser, tuned, x, sigma)


@single_threaded
def test_edm_songunet_layout():
    torch.manual_seed(2)
    precond = Precond()
    with torch.no_grad():
        for p in precond.parameters():
            p.add_(0.2 * torch.randn_like(p))
    denoiser = EDMNetwork(precond).eval()
    net = precond.model
    layout = find_layout(precond)
    assert layout.kind == "edm-unet" and layout.path == "model"
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 1.5)

    def encoder(store):  # every non-aux encoder block pushes a skip (aux_residual rewrites the last)
        pushers = [b for n, b in net.enc.items() if "aux" not in n]
        residual = net.enc["4x4_aux_residual"]
        handles = record(pushers, pre=False, store=store)
        handles.append(
            residual.register_forward_hook(
                lambda m, a, out: store.__setitem__(-1, (store[-1] + out) / 2**0.5)
            )
        )
        return handles

    def decoder(store):  # a concatenating block's norm0 sees its (scaled) input
        takers = [net.dec[n] for n in ("4x4_block0", "4x4_block1", "8x8_block0", "8x8_block1")]
        return record([b.norm0 for b in takers], pre=True, store=store)

    tuned = check_concatenations(denoiser, encoder, decoder, x, sigma)
    check_left_intact(denoiser, tuned, x, sigma)


@single_threaded
def test_no_reachable_skips_is_not_applicable(registry):
    mixture = CountingDenoiser(load_model("mixture", CPU, registry=registry))
    with pytest.raises(NotApplicable, match="^skip-tuning is not applicable to model 'mixture': .*skips"):
        apply(mixture, rho_bottom=0.9, rho_top=1.1)
