"""Model sources on small random-init checkpoints written in each real format.

EDM: a pickle in NVlabs' torch_utils.persistence layout (module source + class name +
state per object), written by a writer-side persistence that pickles as NVlabs' does and
is gone before loading. diffusers: `save_pretrained` of a tiny UNet2DModel and its
scheduler, checked step for step against diffusers' own DDIM. Factory: a module file and
safetensors weights. Everything loads through the registry and the CLI users run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from bench import load_model
from bench.cli import main
from bench.contracts import Denoiser, check_denoiser
from bench.errors import ModelLoadError, UsageError
from bench.models.edm import EDM_PRESETS, EDMNetwork, load_edm
from bench.models.factory import load_factory
from bench.plugins import load_registry

CPU = torch.device("cpu")
BENCH = str(Path(sys.executable).with_name("bench"))


def run_args(model: str, out: Path, samplers: str = "euler", nfe: str = "2") -> list[str]:
    """A tiny `bench run` on `model`."""
    return [
        "run",
        "--model",
        model,
        "--samplers",
        samplers,
        "--nfe",
        nfe,
        "--num-samples",
        "4",
        "--batch-size",
        "4",
        "--report",
        "csv",
        "--quiet",
        "--out",
        str(out),
    ]


# A tiny network in the style of NVlabs' training/networks.py: persistent classes in one
# module, the preconditioning holding the UNet, isinstance checks across classes.
NET_SRC = textwrap.dedent("""
    import numpy as np
    import torch
    from torch.nn.functional import silu
    from torch_utils import misc, persistence

    @persistence.persistent_class
    class Block(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            return x + silu(self.conv(x))

    @persistence.persistent_class
    class TinyUNet(torch.nn.Module):
        def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, channels=8):
            super().__init__()
            self.label_dim = label_dim
            self.enc = torch.nn.Conv2d(in_channels, channels, 3, padding=1)
            self.emb = torch.nn.Linear(1 + label_dim, channels)
            self.blocks = torch.nn.ModuleList([Block(channels), Block(channels)])
            self.dec = torch.nn.Conv2d(channels, out_channels, 3, padding=1)

        def forward(self, x, noise_labels, class_labels=None):
            emb = noise_labels.reshape(-1, 1)
            if self.label_dim:
                emb = torch.cat([emb, class_labels.expand(len(x), -1)], dim=1)
            h = self.enc(x) + self.emb(emb)[:, :, None, None]
            for block in self.blocks:
                assert isinstance(block, Block)
                h = block(h)
            return self.dec(silu(h))

    @persistence.persistent_class
    class AugmentPipe:  # not a torch module: state restored through __dict__
        def __init__(self, p=0.12):
            self.p = float(p)

        def __call__(self, images):
            return misc.constant(images)

    @persistence.persistent_class
    class EDMPrecond(torch.nn.Module):
        def __init__(self, img_resolution, img_channels, label_dim=0, sigma_min=0,
                     sigma_max=float('inf'), sigma_data=0.5, model_type='TinyUNet'):
            super().__init__()
            self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
            self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
            self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                               out_channels=img_channels, label_dim=label_dim)

        def forward(self, x, sigma, class_labels=None, force_fp32=False):
            x = x.to(torch.float32)
            sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
            if self.label_dim:
                class_labels = torch.zeros([1, self.label_dim]) if class_labels is None else class_labels
            sd = self.sigma_data
            c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
            c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
            c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
            F_x = self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels=class_labels)
            return c_skip * x + c_out * F_x

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)
""")


@contextlib.contextmanager
def nvlabs_writer():
    """A writer-side `torch_utils.persistence` (and `dnnlib.util.EasyDict`) that pickles
    persistent objects as `_reconstruct_persistent_obj(meta)`, as NVlabs' code does.
    Yields `build(src)` -> the executed module. Everything is removed on exit."""
    sources: dict[str, str] = {}
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the writer never loads")

    def persistent_class(cls):
        src = sources[cls.__module__]

        class Persistent(cls):
            def __reduce__(self):
                fields = list(super().__reduce__()) + [None] * 3
                meta = dict(type="class", version=6, module_src=src, class_name=cls.__name__, state=fields[2])
                return (_reconstruct_persistent_obj, (meta,), None)

        Persistent.__name__ = Persistent.__qualname__ = cls.__name__
        Persistent.__module__ = cls.__module__
        return Persistent

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    persistence.persistent_class = persistent_class
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence, torch_utils.misc = persistence, types.ModuleType("torch_utils.misc")
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.util = util

    def build(src: str) -> types.ModuleType:
        module = types.ModuleType(f"training_networks_{len(sources)}")
        sources[module.__name__] = src
        sys.modules[module.__name__] = module
        exec(src, module.__dict__)
        return module

    names = {
        "torch_utils": torch_utils,
        "torch_utils.persistence": persistence,
        "dnnlib": dnnlib,
        "dnnlib.util": util,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, module in names.items():
            mp.setitem(sys.modules, name, module)
        try:
            yield build, util.EasyDict
        finally:
            for name in sources:
                sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """network-snapshot pickles (unconditional, 3-class) and reference outputs of the
    networks that wrote them: x, sigma, class rows and D for each."""
    root = tmp_path_factory.mktemp("edm")
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    out = {}
    with nvlabs_writer() as (build, EasyDict):
        networks = build(NET_SRC)
        for name, label_dim in (("uncond", 0), ("cond", 3)):
            net = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim).eval()
            with torch.no_grad():
                labels = torch.eye(3)[torch.arange(4) % 3] if label_dim else None
                ref = net(x, sigma, class_labels=labels)
                ref1 = net(x, sigma, class_labels=torch.eye(3)[[1, 1, 1, 1]]) if label_dim else None
            path = root / f"network-snapshot-{name}.pkl"
            data = {
                "ema": net,
                "augment_pipe": networks.AugmentPipe(),
                "dataset_kwargs": EasyDict(resolution=8),
            }
            path.write_bytes(pickle.dumps(data))
            out[name] = (path, ref, ref1)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    return out, x, sigma


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def check_contract(d: Denoiser, shape, *, near_identity: bool = True) -> None:
    """Shapes, sigma limits, finite outputs, and D(x, sigma_min) ~ x."""
    check_denoiser(d)
    assert tuple(d.shape) == shape and 0 < d.sigma_min < d.sigma_max
    x = torch.randn(3, *shape)
    with torch.no_grad():
        for sigma in (d.sigma_min, d.sigma_max):
            out = d(x, sigma)
            assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        if near_identity:
            assert torch.allclose(d(x, d.sigma_min), x, atol=0.05), "D(x, sigma_min) should be ~x"


# --- EDM pickles ------------------------------------------------------------------------


def test_edm_pickle_loads_through_the_registry_exactly(snapshots, registry):
    out, x, sigma = snapshots
    path, ref, _ = out["uncond"]
    d = load_model(f"edm:{path}", CPU, registry=registry, options={"trust_pickle": True})
    assert isinstance(d, EDMNetwork) and type(d.net).__name__ == "EDMPrecond"
    # EDM generate.py's range: [0.002, 80] within the network's [0, inf)
    assert (d.sigma_min, d.sigma_max, d.sigma_data) == (0.002, 80.0, 0.5)
    check_contract(d, (1, 8, 8))
    with torch.no_grad():
        assert torch.equal(d(x, sigma), ref)
        assert torch.allclose(d(x.double(), sigma), ref.double(), atol=1e-6)  # float64 in, float64 out
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


def test_edm_conditional_classes(snapshots):
    out, x, sigma = snapshots
    path, ref, ref1 = out["cond"]
    with torch.no_grad():
        # Default: row i gets class i mod label_dim; class=K fixes one class
        assert torch.equal(load_edm(str(path), trust_pickle=True)(x, sigma), ref)
        assert torch.equal(load_edm(f"{path};class=1", trust_pickle=True)(x, sigma), ref1)
    with pytest.raises(UsageError, match="out of range"):
        load_edm(f"{path};class=3", trust_pickle=True)
    with pytest.raises(UsageError, match="unconditional"):
        load_edm(f"{out['uncond'][0]};class=0", trust_pickle=True)


def test_edm_needs_trust_and_says_so_in_one_line_through_the_cli(snapshots, tmp_path):
    path = snapshots[0]["uncond"][0]
    args = [BENCH, *run_args(f"edm:{path}", tmp_path / "run")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-pickle" in lines[0] and "Traceback" not in proc.stderr


def test_edm_trusted_run_end_to_end(snapshots, tmp_path):
    path = snapshots[0]["uncond"][0]
    code = main([*run_args(f"edm:{path}", tmp_path / "run", "euler,heun", "3"), "--trust-pickle"])
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert code == 0 and [r["status"] for r in records] == ["ok", "ok"]
    assert [r["nfe_counted"] for r in records] == [3, 3]


def test_edm_preset_from_cache_and_offline_errors(snapshots, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    # Offline, nothing cached: one line naming the URL and the cache path
    expected = tmp_path / "edm" / "edm-cifar10-32x32-uncond-vp.pkl"
    with pytest.raises(ModelLoadError) as info:
        load_edm("cifar10-32x32-uncond-vp", trust_pickle=True)
    msg = str(info.value)
    assert "\n" not in msg and EDM_PRESETS["cifar10-32x32-uncond-vp"] in msg and str(expected) in msg
    # Cached: the same spec loads the file from the cache
    expected.parent.mkdir(parents=True)
    expected.write_bytes(snapshots[0]["uncond"][0].read_bytes())
    assert load_edm("cifar10-32x32-uncond-vp", trust_pickle=True).shape == (1, 8, 8)
    # Unknown presets are usage errors with the closest name
    with pytest.raises(UsageError, match="closest: cifar10-32x32-cond-vp"):
        load_edm("cifar10-32x32-cond-vpp", trust_pickle=True)


def test_edm_unreachable_url_fails_fast_without_leftovers(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("BENCH_OFFLINE", raising=False)
    url = "http://127.0.0.1:9/edm-missing.pkl"  # the discard port: connection refused
    with pytest.raises(ModelLoadError) as info:
        load_edm(url, trust_pickle=True)
    msg = str(info.value)
    assert "\n" not in msg and url in msg and str(tmp_path / "edm" / "edm-missing.pkl") in msg
    assert not list(tmp_path.rglob("*.part"))


# --- diffusers --------------------------------------------------------------------------


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.fixture(scope="module")
def diffusers_dirs(tmp_path_factory):
    """save_pretrained checkpoints: flat (UNet + scheduler in one directory) for eps and x0,
    pipeline layout (unet/, scheduler/) for v."""
    from diffusers import DDPMScheduler

    root, unet, dirs = tmp_path_factory.mktemp("diffusers"), tiny_unet(), {}
    for prediction in ("epsilon", "v_prediction", "sample"):
        top = root / prediction
        pipeline = prediction == "v_prediction"
        unet.save_pretrained(top / "unet" if pipeline else top)
        DDPMScheduler(prediction_type=prediction).save_pretrained(top / "scheduler" if pipeline else top)
        dirs[prediction] = top
    return unet, dirs


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_diffusers_euler_step_is_diffusers_ddim(prediction, diffusers_dirs, registry):
    """An Euler step in sigma on the wrapped model equals diffusers' DDIM (eta=0) step on
    the raw UNet: the sigma <-> timestep map and the prediction conversion are right."""
    from diffusers import DDIMScheduler

    unet, dirs = diffusers_dirs
    d = load_model(f"diffusers:{dirs[prediction]}", CPU, registry=registry)
    assert d.prediction == prediction
    check_contract(d, (1, 8, 8), near_identity=prediction != "sample")
    # Linear betas 1e-4..0.02 over 1000 steps, computed here in float64
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(d.discrete_sigmas, ((1 - a) / a).sqrt(), rtol=1e-5)
    ddim = DDIMScheduler(prediction_type=prediction, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(10)  # step ratio 100
    torch.manual_seed(2)
    x_vp = torch.randn(2, 1, 8, 8)
    for t, t_prev in ((500, 400), (900, 800), (100, 0)):
        with torch.no_grad():
            ref = ddim.step(unet(x_vp, t).sample, t, x_vp, eta=0.0).prev_sample
            # The same step in the sigma formulation: x = x_vp sqrt(1 + sigma^2)
            sigma, sigma_next = d.discrete_sigmas[t].float(), d.discrete_sigmas[t_prev].float()
            x = x_vp * (1 + sigma**2).sqrt()
            d_cur = (x - d(x, sigma)) / sigma
            x_next = x + (sigma_next - sigma) * d_cur
        assert torch.allclose(x_next / (1 + sigma_next**2).sqrt(), ref, atol=2e-5, rtol=0)


def test_diffusers_offline_is_one_line_through_the_cli(tmp_path):
    """Nothing cached and the hub unreachable (a refused port): a one-line error."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "BENCH_CACHE": str(tmp_path / "cache"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    args = [BENCH, *run_args("diffusers:ddpm-cifar10-32", tmp_path / "run")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "google/ddpm-cifar10-32" in lines[0] and "not cached" in lines[0]


def test_diffusers_offline_flag_and_bad_specs(tmp_path, monkeypatch, registry):
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="bench-tests/no-such-repo.*not cached"):
        load_model("diffusers:bench-tests/no-such-repo", CPU, registry=registry)
    with pytest.raises(UsageError, match="closest: ddpm-cifar10-32"):
        load_model("diffusers:ddpm-cifar10", CPU, registry=registry)
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(f"diffusers:{tmp_path}/missing/dir", CPU, registry=registry)


# --- Python factories -------------------------------------------------------------------

FACTORY_SRC = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, channels, 3, padding=1)
            self.out = torch.nn.Conv2d(channels, 1, 1)

        def forward(self, x, c_noise):
            return self.out(torch.tanh(self.conv(x) + c_noise.reshape(-1, 1, 1, 1)))

    def build(kind="edm", prediction="eps", channels=4):
        return {"net": Net(channels), "shape": (1, 8, 8), "kind": kind, "prediction": prediction}

    def build_discrete():
        a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        return {"net": Net(4), "shape": (1, 8, 8), "kind": "discrete", "alphas_cumprod": a}

    def build_denoiser():
        from bench.models.analytic import gaussian
        return gaussian(shape=(1, 8, 8))

    class Net28(torch.nn.Module):  # a tiny MNIST-sized network on (x, t), as flow and DDPM nets

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.out = torch.nn.Conv2d(4, 1, 1)

        def forward(self, x, t):
            return self.out(torch.tanh(self.conv(x) + t.reshape(-1, 1, 1, 1) / 1000))

    class Trainer(torch.nn.Module):  # how training code holds it: keys start with 'network.'

        def __init__(self):
            super().__init__()
            self.network = Net28()

    def build_flow(prediction="velocity", time_scale=1000.0, channels=1, kind="flow"):
        return {"net": Net28(), "shape": (channels, 28, 28), "kind": kind, "prediction": prediction,
                "time_scale": time_scale}

    def build_ddpm28():
        a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        return {"net": Net28(), "shape": (1, 28, 28), "kind": "discrete", "alphas_cumprod": a}
""")


@pytest.fixture
def factory(tmp_path):
    """A factory module file and safetensors weights (not the factory's own init)."""
    from safetensors.torch import save_file

    path = tmp_path / "tiny_factory.py"
    path.write_text(FACTORY_SRC)
    namespace: dict = {}
    exec(FACTORY_SRC, namespace)
    torch.manual_seed(3)
    net = namespace["build"](channels=6)["net"]
    weights = tmp_path / "net.safetensors"
    save_file(net.state_dict(), weights)
    return path, weights, net


def test_factory_vp_v_prediction_with_safetensors(factory, registry):
    path, weights, net = factory
    spec = f"factory:{path}:build;weights={weights};kind=vp;prediction=v;channels=6"
    d = load_model(spec, CPU, registry=registry)
    check_contract(d, (1, 8, 8))
    # VP (Song et al. 2021; EDM Table 1) by hand: x_vp, t(sigma), v -> x0
    beta_d, beta_min = 19.9, 0.1
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 5.0])
    s = sigma.reshape(-1, 1, 1, 1)
    t = ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d
    x_vp = x / (1 + s**2).sqrt()
    with torch.no_grad():
        v = net(x_vp, 999 * t)
        assert torch.allclose(d(x, sigma), (x_vp - s * v) / (1 + s**2).sqrt(), atol=1e-5)
    assert d.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * beta_d + beta_min) - 1))


def test_factory_discrete_and_ready_denoisers(factory, registry):
    path = factory[0]
    d = load_model(f"factory:{path}:build_discrete", CPU, registry=registry)
    check_contract(d, (1, 8, 8))
    assert d.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4))) and d.prediction == "epsilon"
    ready = load_model(f"factory:{path}:build_denoiser", CPU, registry=registry)
    assert type(ready).__name__ == "GaussianMixture" and ready.shape == (1, 8, 8)


def test_factory_errors_are_one_line(factory, tmp_path):
    path, weights, _ = factory
    with pytest.raises(UsageError, match="module:function"):
        load_factory("no_colon_here")
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_module_xyz'"):
        load_factory("no_such_module_xyz:build")
    with pytest.raises(ModelLoadError, match="do not match"):
        load_factory(f"{path}:build;weights={weights};channels=5")
    with pytest.raises(UsageError, match="unknown kind 'nope'; use edm, vp, ve, discrete, flow"):
        load_factory(f"{path}:build;kind=nope")
    with pytest.raises(UsageError, match="prediction is for vp, discrete and flow"):
        load_factory(f"{path}:build;kind=edm;prediction=x0")


@pytest.fixture
def torch_checkpoint(factory, tmp_path):
    """The 28x28 network saved as training code saves it: a torch `.pt` state dict whose keys
    carry the `network.` prefix."""
    namespace: dict = {}
    exec(FACTORY_SRC, namespace)
    torch.manual_seed(4)
    trainer = namespace["Trainer"]()
    path = tmp_path / "mnist.pt"
    torch.save(trainer.state_dict(), path)
    assert next(iter(torch.load(path, weights_only=True))).startswith("network.")
    return factory[0], path, trainer.network


def test_factory_flow_from_a_torch_state_dict_with_a_key_prefix(torch_checkpoint, registry):
    path, weights, net = torch_checkpoint
    spec = f"factory:{path}:build_flow;weights={weights};strip_prefix=network."
    d = load_model(spec, CPU, registry=registry)
    check_contract(d, (1, 28, 28), near_identity=False)
    # Rectified flow by hand: t = sigma / (1 + sigma), x_t = x / (1 + sigma), x0 = x_t - t v
    x, sigma = torch.randn(3, 1, 28, 28), torch.tensor([0.05, 1.0, 30.0])
    t = (sigma / (1 + sigma)).reshape(-1, 1, 1, 1)
    x_t = x / (1 + sigma.reshape(-1, 1, 1, 1))
    with torch.no_grad():
        assert torch.allclose(d(x, sigma), x_t - t * net(x_t, 1000 * t.reshape(-1)), atol=1e-6)
        # x0 and eps predictions read the same output as x0, and as eps: x0 = (x_t - t eps) / (1 - t)
        for prediction, x0 in (("x0", net(x_t, 1000 * t.reshape(-1))),
                               ("eps", (x_t - t * net(x_t, 1000 * t.reshape(-1))) / (1 - t))):
            other = load_model(f"{spec};prediction={prediction}", CPU, registry=registry)
            assert torch.allclose(other(x, sigma), x0, atol=1e-5)
    assert d.describe()["time"] == "flow" and d.describe()["time_scale"] == 1000.0
    assert d.default_schedule == "flow" and d.sigma_max == pytest.approx(999, rel=1e-6)
    # A torch file under a name of no known suffix loads too (safetensors tried first)
    bare = weights.with_name("mnist-weights")
    bare.write_bytes(weights.read_bytes())
    same = load_model(spec.replace(str(weights), str(bare)), CPU, registry=registry)
    assert torch.equal(same(x, sigma), d(x, sigma))


def test_factory_records_the_parameterization_in_config_and_every_record(torch_checkpoint, tmp_path):
    path, weights = torch_checkpoint[:2]
    flow = f"factory:{path}:build_flow;weights={weights};strip_prefix=network."
    ddpm = f"factory:{path}:build_ddpm28;weights={weights};strip_prefix=network."
    out = tmp_path / "run"
    args = run_args(f"{flow},{ddpm}", out, "euler", "2")
    assert main(args) == 0
    info = json.loads((out / "config.json").read_text())["model_info"]
    assert info[flow]["time"] == "flow" and info[flow]["prediction"] == "velocity"
    assert info[flow]["time_scale"] == 1000.0 and info[flow]["t_min"] == pytest.approx(1e-3)
    assert info[ddpm]["timesteps"] == 1000 and info[ddpm]["prediction"] == "epsilon"
    assert info[ddpm]["sigma_min"] == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)))
    records = {r["model"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records[flow]["model_info"] == info[flow] and records[ddpm]["model_info"] == info[ddpm]
    # A method that names no schedule gets the flow model's own, recorded as such
    assert records[flow]["schedule"] == records[flow]["spec"]["schedule"] == "flow"
    assert records[ddpm]["schedule"] == "karras"


@pytest.mark.parametrize(
    "options, message",
    [
        (";strip_prefix=network.;channels=3", "fails on a batch of declared shape (3, 28, 28)"),
        (";strip_prefix=network.;kind=nope", "unknown kind 'nope'"),
        (";strip_prefix=network.;prediction=v_prediction", "kind 'flow' has no prediction 'v_prediction'"),
        (";strip_prefix=network.;size=3", "unexpected keyword argument 'size'"),
        ("", "strip_prefix= (e.g. network.)"),
        (";strip_prefix=module.", "no key of"),
    ],
)
def test_factory_load_problems_are_one_line_exit_2(torch_checkpoint, tmp_path, capsys, options, message):
    path, weights = torch_checkpoint[:2]
    code = main(run_args(f"factory:{path}:build_flow;weights={weights}{options}", tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "results.jsonl").exists()  # nothing sampled


def test_factory_spec_mistakes_are_one_line_exit_2(torch_checkpoint, tmp_path, capsys):
    path, weights = torch_checkpoint[:2]
    for k, (spec, message) in enumerate((
        (f"factory:{path}:build_flow:weights={weights}", "options follow the function after ';', not ':'"),
        (f"factory:{path}:build_flow;weights={tmp_path / 'gone.pt'}", "no such weights file"),
        (f"factory:{tmp_path / 'gone.py'}:build_flow", "no such file"),
        (f"factory:{path}:build_flow;weights={path}", "neither safetensors nor a torch state dict"),
    )):
        assert main(run_args(spec, tmp_path / f"run{k}")) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
