"""The CLIP score on a tiny random CLIPModel built from a config and saved with its tokenizer
(the layout of a real checkpoint directory): finite values, the score of a pair is its own,
invariances, the runner end to end, and one-line exit-2 errors when it cannot run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: E402

from bench.cli import main  # noqa: E402
from bench.contracts import Batch, MetricContext  # noqa: E402
from bench.metrics.clip import Clip  # noqa: E402
from bench.models.analytic import gaussian  # noqa: E402
from bench.plugins import load_registry  # noqa: E402

PROMPTS = ["a red cat", "a dog on grass", "two birds"]
MODEL_FILE = '''
from bench.models.analytic import gaussian


def build():
    model = gaussian(shape=(3, 8, 8))
    model.prompts = {prompts!r}
    return model
'''


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random CLIP (2 layers, width 32, 32x32 images) and a letter-level BPE tokenizer,
    written by save_pretrained as a downloaded checkpoint is."""
    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def score(registry, checkpoint, x: torch.Tensor, batch: int, prompts=PROMPTS, cache=None):
    """The metric's per-sample scores and result, fed in batches as the runner feeds it."""
    model = gaussian(shape=(3, 8, 8))
    model.prompts = prompts
    ctx = MetricContext("test", model, len(x), 0, torch.device("cpu"), {} if cache is None else cache,
                        {"clip": str(checkpoint)})
    state = registry.get("metrics", "clip").create(ctx)
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        state.update(Batch(chunk, torch.zeros_like(chunk), torch.arange(start, start + len(chunk)), 80.0))
    return torch.cat(state.scores), state.result()["clip_score"]


def test_clip_score_is_100_cos_of_each_sample_and_its_prompt(registry, checkpoint):
    x = images(7)
    per, value = score(registry, checkpoint, x, batch=3)
    assert torch.isfinite(per).all() and per.abs().max() <= 100 and value.n == 7 and value.higher_is_better
    assert value.value == pytest.approx(float(per.mean())) and value.std > 0
    # The same numbers from transformers directly: sample i against prompt i mod 3
    clip = Clip(str(checkpoint), torch.device("cpu"))
    with torch.no_grad():
        enc = clip.tokenizer([PROMPTS[i % 3] for i in range(7)], padding=True, return_tensors="pt")
        text = clip.model.get_text_features(**enc)
        image = clip.model.get_image_features(pixel_values=clip.pixels(x))
    text, image = (t if isinstance(t, torch.Tensor) else t.pooler_output for t in (text, image))
    torch.testing.assert_close(per.float(), 100 * F.cosine_similarity(image, text), atol=1e-4, rtol=1e-4)


def test_identical_pairs_score_identically_and_batching_changes_nothing(registry, checkpoint):
    x = images(6)
    x[3] = x[0]  # samples 0 and 3 share prompt 0 and their image
    per, value = score(registry, checkpoint, x, batch=6)
    assert per[0] == pytest.approx(float(per[3]), abs=1e-5)
    assert per[1] != pytest.approx(float(per[4]), abs=1e-3)  # same prompt, other images
    per_2, value_2 = score(registry, checkpoint, x, batch=2)
    torch.testing.assert_close(per_2, per, atol=1e-5, rtol=1e-5)
    assert value_2.value == pytest.approx(value.value, abs=1e-5)


def test_the_score_is_a_cosine_invariant_to_the_embeddings_scale(registry, checkpoint, tmp_path):
    x = images(4, seed=1)
    per, _ = score(registry, checkpoint, x, batch=4)
    model = CLIPModel.from_pretrained(checkpoint)
    with torch.no_grad():
        model.visual_projection.weight.mul_(3.0)
        model.text_projection.weight.mul_(0.5)
    scaled = tmp_path / "scaled"
    model.save_pretrained(scaled)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"):
        if (checkpoint / name).exists():
            (scaled / name).write_bytes((checkpoint / name).read_bytes())
    per_scaled, _ = score(registry, scaled, x, batch=4)
    torch.testing.assert_close(per_scaled, per, atol=1e-4, rtol=1e-4)
    # Prompts listed in another order score each sample against its own prompt still
    reordered = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    swapped = x[[1, 0, 2, 3]]
    per_swapped, _ = score(registry, checkpoint, swapped, batch=4, prompts=reordered)
    torch.testing.assert_close(per_swapped[:3], per[[1, 0, 2]], atol=1e-4, rtol=1e-4)


def _run(tmp_path, model: str, *extra: str) -> tuple[int, list[dict]]:
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    code = main(["run", "--model", model, "--samplers", "euler", "--nfe", "2", "--num-samples", "5",
                 "--metrics", "clip", "--quiet", "--report", "csv", "--out", str(out), *extra])
    rows = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
    return code, [json.loads(r) for r in rows]


def test_clip_through_the_runner_on_a_model_with_prompts(tmp_path, checkpoint):
    factory = tmp_path / "prompted.py"
    factory.write_text(MODEL_FILE.format(prompts=PROMPTS))
    code, records = _run(tmp_path, f"factory:{factory}:build", "--metric-option", f"clip={checkpoint}")
    assert code == 0 and records[0]["status"] == "ok"
    clip = records[0]["metrics"]["clip_score"]
    assert clip["n"] == 5 and clip["title"] == "CLIP score" and -100 <= clip["value"] <= 100
    assert records[0]["spec"]["metric_options"] == {"clip": str(checkpoint)}


def test_no_checkpoint_or_no_prompts_is_one_line_exit_2(tmp_path, capsys, checkpoint):
    factory = tmp_path / "prompted.py"
    factory.write_text(MODEL_FILE.format(prompts=PROMPTS))
    cases = [
        (f"factory:{factory}:build", [], "--metric-option clip=DIR"),
        (f"factory:{factory}:build", ["--metric-option", f"clip={tmp_path / 'none'}"], "no config.json"),
        ("gaussian:3x8x8", ["--metric-option", f"clip={checkpoint}"], "no prompts"),
    ]
    for model, extra, expected in cases:
        code, records = _run(tmp_path, model, *extra)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err and not records, err
