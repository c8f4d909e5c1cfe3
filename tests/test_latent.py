"""Latent text-to-image pipelines through `diffusers:DIR`, prompts and classifier-free guidance.

Tiny random-weight pipelines are built here from configs (a CLIP tokenizer on a vocabulary
written here, CLIP text encoders, AutoencoderKL, UNet2DConditionModel, SD3Transformer2DModel)
and saved with save_pretrained: a Stable Diffusion pipeline (scaled_linear betas, eps) and an
SD3 pipeline without T5 (FlowMatchEulerDiscreteScheduler, shift 3). Our Euler with `cfg` is
checked against diffusers' own pipelines (DDIM, FlowMatchEuler) from the same latents, and
`bench run` runs both end to end with --prompts, counting NFE and nfe_equiv.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import load_model
from bench.cell import CellSpec, Method, Spec, build
from bench.cli import main
from bench.conditioning import read_prompts
from bench.errors import ModelLoadError, UsageError
from bench.models.diffusers import flow_shift, pipeline_files
from bench.plugins import load_registry

CPU = torch.device("cpu")
PROMPTS = ["a red fox in the snow", "a lighthouse at night", "an astronaut on a horse", "a bowl of ramen"]
CHARS = "abcdefghijklmnopqrstuvwxyz,.-'!0123456789"


def tokenizer(root: Path):
    """A CLIP BPE tokenizer on single characters (no merges), 16 tokens long."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: i + 2 for i, c in enumerate(CHARS)}
    vocab |= {c + "</w>": i + 2 + len(CHARS) for i, c in enumerate(CHARS)}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16,
                         pad_token="<|endoftext|>")


def text_encoder(cls, seed: int, hidden: int = 16):
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=hidden, intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return cls(config).eval()


def vae(shift_factor: float | None = None):
    """A VAE of factor 2 with SD's scaling factor (SD3's also shifts: 0.0609)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                         shift_factor=shift_factor)


def sd_pipeline(root: Path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    # Stable Diffusion v1's scheduler config
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
                              prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae(), text_encoder=text_encoder(CLIPTextModel, 2),
                                   tokenizer=tokenizer(root), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd3_pipeline(root: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(4)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(0.0609),
        text_encoder=text_encoder(CLIPTextModelWithProjection, 5), tokenizer=tokenizer(root),
        text_encoder_2=text_encoder(CLIPTextModelWithProjection, 6), tokenizer_2=tokenizer(root),
        text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """{"sd": dir, "sd3": dir, "prompts": file, "unet_only": dir} saved with save_pretrained."""
    root = tmp_path_factory.mktemp("latent")
    out = {"sd": root / "sd", "sd3": root / "sd3", "prompts": root / "prompts.txt",
           "unet_only": root / "unet"}
    sd = sd_pipeline(root)
    sd.save_pretrained(out["sd"])
    sd.unet.save_pretrained(out["unet_only"])
    sd3_pipeline(root).save_pretrained(out["sd3"])
    out["prompts"].write_text("\n".join(PROMPTS) + "\n\n")  # a trailing blank line is no prompt
    return out


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def load(registry, spec: str, prompts: Path):
    return load_model(spec, CPU, registry=registry, options={"prompts": str(prompts)})


def cfg_solve(registry, model, nfe: int, scale: float):
    """Euler + cfg:scale on the model, built as a run builds its cells."""
    method = Method(Spec("euler"), Spec("karras"), (Spec("cfg", (("scale", str(scale)),)),))
    return build(registry, CellSpec(model.spec, method, nfe, num_samples=6), model)


def images(pipe, prompts, steps: int, scale: float, latents, **kw):
    """diffusers' own pipeline loop, decoded to [0, 1]."""
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=scale, latents=latents, height=16,
                    width=16, output_type="pt", **kw).images


# --- The numbers: our samplers on the adapted pipeline are diffusers' loops ---------------


def test_sd_euler_with_cfg_is_diffusers_ddim_pipeline(pipelines, registry):
    """Euler in sigma with cfg on the SD model equals StableDiffusionPipeline with DDIM (eta 0)
    at the same guidance scale from the same latents, prompts i mod n, decoded by the VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = load(registry, f"diffusers:{pipelines['sd']}", pipelines["prompts"])
    pipe = StableDiffusionPipeline.from_pretrained(pipelines["sd"])
    config = pipe.scheduler.config
    pipe.scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=True, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    steps, scale, indices = 4, 4.0, torch.tensor([3, 4, 5])
    # DDIM's timesteps (leading, offset 1) as sigmas, then its last step to alpha = 1
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(steps)
    solve = cfg_solve(registry, model, steps, scale)
    last = torch.zeros(1, dtype=torch.float64)
    solve.sigmas = torch.cat([model.discrete_sigmas[ddim.timesteps], last]).float()
    out = solve.sample(indices)
    assert (out.nfe, out.extra_cost) == (steps, steps)  # 1 NFE and 1 more nfe_equiv per step
    # diffusers from the same start, in its VP scale x / sqrt(1 + sigma^2)
    s0 = solve.sigmas[0]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in indices]
    ref = images(pipe, prompts, steps, scale, out.eps * s0 / (1 + s0**2).sqrt())
    assert out.x0.shape == (3, 3, 16, 16) and out.decode_s > 0
    assert torch.allclose(out.x0 * 0.5 + 0.5, ref, atol=2e-5, rtol=0), (out.x0 * 0.5 + 0.5 - ref).abs().max()


def test_sd3_euler_with_cfg_is_diffusers_flow_match_euler(pipelines, registry):
    """Euler in sigma on Flow(t x 1000) with cfg equals StableDiffusion3Pipeline with its
    FlowMatchEulerDiscreteScheduler (shift 3) on the same sigmas from the same latents."""
    from diffusers import StableDiffusion3Pipeline

    model = load(registry, f"diffusers:{pipelines['sd3']}", pipelines["prompts"])
    assert model.default_schedule == "flow:shift=3" and model.describe()["shift"] == 3.0
    pipe = StableDiffusion3Pipeline.from_pretrained(pipelines["sd3"], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    steps, scale, indices = 4, 5.0, torch.tensor([1, 2, 6])
    solve = cfg_solve(registry, model, steps, scale)
    # The scheduler's shifted t (t = 1 is sigma = inf, so the ramp starts below it), to sigma
    pipe.scheduler.set_timesteps(sigmas=[0.9, 0.7, 0.5, 0.3])
    t = pipe.scheduler.sigmas.double()
    solve.sigmas = (t / (1 - t)).float()
    out = solve.sample(indices)
    assert (out.nfe, out.extra_cost) == (steps, steps)
    ref = images(pipe, [PROMPTS[i % len(PROMPTS)] for i in indices], steps, scale, out.eps * t[0].float(),
                 sigmas=[0.9, 0.7, 0.5, 0.3])
    assert torch.allclose(out.x0 * 0.5 + 0.5, ref, atol=2e-5, rtol=0), (out.x0 * 0.5 + 0.5 - ref).abs().max()


def test_each_sample_takes_prompt_i_mod_n(pipelines, registry):
    """select(indices) picks prompt i mod n's embeddings, as the pipeline encodes them; a
    batch nothing selected takes rows 0..B-1; the unconditional one is the empty prompt's."""
    from diffusers import StableDiffusion3Pipeline

    model = load(registry, f"diffusers:{pipelines['sd3']}", pipelines["prompts"])
    pipe = StableDiffusion3Pipeline.from_pretrained(pipelines["sd3"], text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt([PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[0]],
                                                             None, None, negative_prompt="")
    assert model.conditioning(2)["encoder_hidden_states"].shape == (2, 16 + 256, 32)
    model.select(torch.tensor([5, 6, 7, 8]))
    got, uncond = model.conditioning(4), model.conditioning(4, unconditional=True)
    for mine, theirs in ((got, (embeds, pooled)), (uncond, (neg, neg_pooled))):
        for key, ref in zip(("encoder_hidden_states", "pooled_projections"), theirs, strict=True):
            assert torch.allclose(mine[key], ref, atol=1e-6, rtol=0), key  # batches round apart
    assert not torch.equal(got["encoder_hidden_states"][0], got["encoder_hidden_states"][1])


# --- Loading: geometry, shift, options ------------------------------------------------------


def test_resolution_shift_and_describe(pipelines, registry):
    sd = load(registry, f"diffusers:{pipelines['sd']};resolution=24x12", pipelines["prompts"])
    assert sd.shape == (4, 12, 6) and sd.decode(torch.zeros(1, 4, 12, 6)).shape == (1, 3, 24, 12)
    info = sd.describe()
    assert info["pipeline"] == "StableDiffusionPipeline" and info["prediction"] == "epsilon"
    assert info["timesteps"] == 1000 and info["latent_shape"] == [4, 12, 6] and info["vae"]["factor"] == 2
    assert info["prompts"]["count"] == len(PROMPTS) and info["beta_schedule"] == "scaled_linear"
    sd3 = load(registry, f"diffusers:{pipelines['sd3']};shift=2", pipelines["prompts"])
    assert sd3.default_schedule == "flow:shift=2" and sd3.describe()["shift"] == 2.0
    assert math.isclose(sd3.t_min, 2e-3 / (1 + 1e-3))  # the scheduler's last trained t, shifted


def test_dynamic_shift_is_diffusers_calculate_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).config
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    assert math.isclose(flow_shift(config, 1024, None), math.exp(mu))
    assert flow_shift(config, 1024, 3.0) == 3.0


@pytest.mark.parametrize(("suffix", "error", "match"), [
    ("sd;resolution=15", UsageError, "multiples of 2"),
    ("sd;resolution=big", UsageError, "N or HxW"),
    ("sd;shift=3", UsageError, "flow pipelines only"),
    ("sd;class=1", UsageError, "class-conditional"),
    ("sd3;shift=-1", UsageError, "positive"),
    ("unet_only", ModelLoadError, "without its pipeline"),
])
def test_bad_specs_are_one_line(pipelines, registry, suffix, error, match):
    name, _, option = suffix.partition(";")
    spec = f"diffusers:{pipelines[name]}" + (f";{option}" if option else "")
    with pytest.raises(error, match=match) as info:
        load(registry, spec, pipelines["prompts"])
    assert "\n" not in str(info.value)


def test_hub_files_of_a_pipeline():
    """From a hub listing: model_index, each part's configs and tokenizer files and its
    full-precision weights (every shard), no fp16 variants, nothing sampling never uses."""
    files = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
             "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
             "safety_checker/model.safetensors", "README.md", "v1-5-pruned.ckpt"}
    wanted = set(pipeline_files(files))
    left = {"unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
            "safety_checker/model.safetensors", "README.md", "v1-5-pruned.ckpt"}
    assert wanted == files - left


# --- End to end: bench run with --prompts and cfg ------------------------------------------


def run_argv(models: str, out: Path, prompts: Path | None, modifiers: str = "cfg:scale=5") -> list[str]:
    argv = ["run", "--model", models, "--samplers", "euler", "--nfe", "3", "--modifiers", modifiers,
            "--num-samples", "4", "--batch-size", "3", "--report", "csv", "--quiet", "--out", str(out),
            "--metric-option", "reference_steps=4"]  # the metric of models without their own, kept short
    return argv + (["--prompts", str(prompts)] if prompts else [])


def test_bench_run_latent_pipelines_with_prompts_and_cfg(pipelines, tmp_path, capsys):
    models = f"diffusers:{pipelines['sd']},diffusers:{pipelines['sd3']}"
    assert main(run_argv(models, tmp_path / "run", pipelines["prompts"])) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"]
    # Budget 3 spent exactly; each call on [uncond; cond] counts twice in nfe_equiv
    assert [(r["nfe_counted"], r["nfe_equiv"]) for r in records] == [(3, 6.0), (3, 6.0)]
    assert all(r["decode_s"] > 0 and "cfg:scale=5" in r["modifiers_applied"][0] for r in records)
    # The flow model's preferred schedule, its shift, where the method names none
    assert records[1]["schedule"] == "flow:shift=3"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["prompts"] == records[0]["spec"]["prompts"] and len(config["prompts"]) == 16
    # Another prompt set into the same directory is another sweep: one line, exit 2
    other = tmp_path / "other.txt"
    other.write_text("a cat\n")
    capsys.readouterr()
    assert main(run_argv(models, tmp_path / "run", other)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompts" in err[0]


def test_cfg_on_an_unconditional_model_is_infeasible(tmp_path):
    assert main(run_argv("digits", tmp_path / "run", None, "cfg")) == 0
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text())
    assert record["status"] == "infeasible" and "no conditioning" in record["reason"]


def test_bad_prompt_files_exit_2_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for path, match in ((tmp_path / "missing.txt", "no such file"), (empty, "has no prompts")):
        assert main(run_argv("digits", tmp_path / "run", path, "none")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    assert len(read_prompts()) == 32  # the packaged set


def test_cfg_passes_the_modifier_conformance_kit(pipelines, registry):
    """Counted calls are the network's, samples are repeatable and do not depend on their batch
    mates (each keeps its prompt), and scale=1 is the conditional model itself."""
    from bench.testing import check_modifier

    model = load(registry, f"diffusers:{pipelines['sd']}", pipelines["prompts"])
    check_modifier("cfg", model=model, options={"scale": 4.0}, neutral={"scale": 1.0}, nfe=3)


def test_a_cfg_cells_reference_is_the_guided_ode(pipelines, tmp_path):
    # Heun at the reference's own steps (EDM Algorithm 1 on the same Karras schedule) solves
    # exactly the reference's ODE: with cfg it matches only if the reference is guided too
    model = f"diffusers:{pipelines['sd3']}"
    argv = run_argv(model, tmp_path / "run", pipelines["prompts"], "none,cfg:scale=5")
    argv[argv.index("euler")] = "heun:afs=false"
    argv[argv.index("--nfe") + 1] = "8"
    argv += ["--schedule", "karras"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    rmse = {tuple(r["modifiers"]): r["metrics"]["reference_rmse"]["value"] for r in records}
    assert set(rmse) == {(), ("cfg:scale=5",)}
    assert max(rmse.values()) < 1e-5, rmse
