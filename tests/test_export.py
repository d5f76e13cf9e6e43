"""python -m clipdist.export: a run's DeepSpeed checkpoint -> transformers CLIPModel / OpenCLIP.

The round trip is real end to end: open_clip builds a model (random init, no download), its
state dict enters training through ``model.pretrained`` on 2 gloo ranks with DeepSpeed (ZeRO 0
and ZeRO 3), each writes a checkpoint, and the exported model, loaded by the real transformers
and open_clip packages, computes clipdist's embeddings (float32, atol 1e-5) and, for open_clip,
gives back open_clip's original weights bit for bit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdist.config import ModelConfig, load_config
from clipdist.data.transforms import clip_preprocess
from clipdist.export import BUILTIN_CONFIGS, builtin_name, checkpoint_state_dict, export_open_clip, load_run_model, open_clip_model_cfg
from clipdist.export.__main__ import main as export_main
from clipdist.models import build_model, tokenize
from clipdist.models.clip import from_openai_state_dict
from conftest import run_distributed
from shard_helpers import write_indexed_shards
from test_models import TINY_RESNET, TINY_VIT, perturb_, random_tokens

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["a photo of the number 7.", "A handwritten digit SEVEN!", "it's 3:45pm & naïve café", "x " * 30]
# conf/model/vit_tiny.yaml (the +experiment=tiny model) in open_clip's config format, by hand.
VIT_TINY_OPEN_CLIP = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
SIGLIP_VIT = ModelConfig(**{**TINY_VIT.__dict__, "init_logit_scale": math.log(10.0), "init_logit_bias": -10.0})


@pytest.fixture(scope="module")
def open_clip():
    # Imported here, not at the top: the DeepSpeed ranks import this module and need no open_clip (10 s).
    return pytest.importorskip("open_clip", reason="open_clip (test extra) is the independent reference; it does not import here")


def register_open_clip_config(open_clip, config: dict, path: Path) -> str:
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return path.stem


def _pretrained_run_on_rank(rank: int, world_size: int, train_urls: str, weights: str, run_dirs: dict) -> dict:
    """train.build_components with model.pretrained, then a checkpoint, for each ZeRO stage."""
    from clipdist.distributed import DistEnv
    from clipdist.engine import TrainState
    from clipdist.train import build_components

    module_states = {}
    for stage, run_dir in run_dirs.items():
        overrides = [
            "+experiment=tiny",
            f"model.pretrained={weights}",
            f"deepspeed.zero_stage={stage}",
            f"data.train_urls='{train_urls}'",
            "data.generate_digits=false",
            f"train.output_dir={run_dir}",
        ]
        cfg, resolved = load_config(overrides)
        env = DistEnv.from_environ({**os.environ, "LOCAL_WORLD_SIZE": str(world_size)})  # run_distributed: one node
        run = build_components(cfg, env, resolved)
        if stage == 0:  # ZeRO-3 leaves each rank only its partition of the module
            module_states[stage] = {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()}
        run.checkpointer.save(run.engine, TrainState(), run.data.state_dict())
        run.logger.close()
    return module_states


@pytest.fixture(scope="module")
def pretrained_runs(tmp_path_factory, open_clip):
    """(open_clip reference model, its state dict in our names, the engine's module state, run dirs by ZeRO stage)."""
    tmp = tmp_path_factory.mktemp("export")
    train_urls = write_indexed_shards(str(tmp / "shards"), "train", [32, 32])  # no step is taken; the loader needs shards
    name = register_open_clip_config(open_clip, VIT_TINY_OPEN_CLIP, tmp / "clipdist-vit-tiny.json")
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    perturb_(reference)
    weights = tmp / f"{name}.pt"  # beside its config, whose quick_gelu states the weights' activation
    torch.save(reference.state_dict(), weights)
    run_dirs = {0: str(tmp / "run_zero0"), 3: str(tmp / "run_zero3")}
    module_states = run_distributed(_pretrained_run_on_rank, world_size=2, args=(train_urls, str(weights), run_dirs), timeout=240)
    expected = from_openai_state_dict(reference.state_dict())
    return reference, expected, module_states[0][0], {stage: Path(d) for stage, d in run_dirs.items()}


def assert_same_tensors(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: keys differ: {sorted(actual.keys() ^ expected.keys())[:5]}"
    for key, value in expected.items():
        assert torch.equal(actual[key].float(), value.float()), f"{what}: {key} differs (exact float32 expected)"


@pytest.mark.slow
def test_pretrained_weights_reach_the_engine_and_both_zero_checkpoints(pretrained_runs):
    """model.pretrained through the trainer's build_components: the DeepSpeed module holds
    open_clip's weights, and the ZeRO-0 file and the merged ZeRO-3 partitions give them back."""
    _, expected, module_state, run_dirs = pretrained_runs
    assert_same_tensors(module_state, expected, "engine.module after model.pretrained")
    for stage, run_dir in run_dirs.items():
        checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        assert_same_tensors(checkpoint_state_dict(checkpoint), expected, f"ZeRO-{stage} checkpoint")
    assert list((run_dirs[3] / "checkpoints" / "step_00000000").glob("*zero_pp_rank_1_*model_states.pt")), "ZeRO-3 wrote per-rank partitions"


@pytest.mark.slow
def test_hf_export_computes_clipdist_embeddings(pretrained_runs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the reference for --to hf; it does not import here")
    run_dir = pretrained_runs[3][0]  # the ZeRO-0 run
    out = tmp_path / "hf"
    assert export_main([str(run_dir), "--to", "hf", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _, model = load_run_model(run_dir)
    hf_model = transformers.CLIPModel.from_pretrained(str(out)).eval()
    processor = transformers.CLIPProcessor.from_pretrained(str(out))

    # Tokenizer built from the vendored BPE: clipdist's ids up to and including EOT (HF pads with EOT, we with 0).
    hf_tokens = processor.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    ours = tokenize(CAPTIONS, context_length=16)
    for row, caption in enumerate(CAPTIONS):
        length = int(ours[row].argmax()) + 1
        assert hf_tokens["input_ids"][row, :length].tolist() == ours[row, :length].tolist(), caption

    # Image processor: clipdist's preprocessing (bicubic shortest side, centre crop, CLIP mean/std).
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 40), (32, 32), (70, 90))]
    pixels = processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
    expected_pixels = torch.stack([clip_preprocess(p, 32) for p in pictures])
    # HF's bicubic resize is not PIL's: resized pixels may differ by one grey level (1/255/std ≈ 0.015,
    # measured: at most that); the 32×32 picture, which is not resized, agrees to float32 rounding.
    torch.testing.assert_close(pixels, expected_pixels, atol=0.016, rtol=0, msg="HF image processor vs clip_preprocess, atol 0.016 (one grey level)")
    torch.testing.assert_close(pixels[1], expected_pixels[1], atol=1e-6, rtol=0, msg="no resize: float32 rounding only, atol 1e-6")

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_image = features(hf_model.get_image_features(pixel_values=torch.cat([images, expected_pixels])))
        hf_text = features(hf_model.get_text_features(input_ids=hf_tokens["input_ids"], attention_mask=hf_tokens["attention_mask"]))
        torch.testing.assert_close(normalized(hf_image), model.encode_image(torch.cat([images, expected_pixels])), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
        torch.testing.assert_close(normalized(hf_text), model.encode_text(ours), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
    assert hf_model.logit_scale.shape == () and hf_model.logit_scale.item() == model.logit_scale.item()


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object (the projection in pooler_output), 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def normalized(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.mark.slow
def test_open_clip_export_gives_back_open_clips_weights(pretrained_runs, tmp_path, capsys, open_clip):
    reference, _, _, run_dirs = pretrained_runs
    out = tmp_path / "vit_tiny_export.pt"
    assert export_main([str(run_dirs[0]), "--to", "open_clip", str(out)]) == 0
    message = capsys.readouterr().out
    assert f"open_clip.add_model_config('{out.with_suffix('.json')}'); open_clip.create_model_and_transforms('vit_tiny_export', pretrained='{out}')" in message
    assert json.loads(out.with_suffix(".json").read_text()) == VIT_TINY_OPEN_CLIP

    open_clip.add_model_config(out.with_suffix(".json"))
    exported, _, preprocess = open_clip.create_model_and_transforms("vit_tiny_export", pretrained=str(out))
    exported.eval()
    assert_same_tensors(exported.state_dict(), reference.state_dict(), "open_clip -> clipdist run -> open_clip")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    assert torch.equal(preprocess(picture), clip_preprocess(picture, 32)), "the exported config gives open_clip clipdist's preprocessing"

    _, model = load_run_model(run_dirs[0])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(CAPTIONS, context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(images, normalize=True), model.encode_image(images), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
        torch.testing.assert_close(exported.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-5, rtol=0, msg="float32, atol 1e-5")


@pytest.mark.parametrize("cfg, suffix", [(TINY_RESNET, ".pt"), (SIGLIP_VIT, ".safetensors")], ids=["resnet", "vit-siglip"])
def test_open_clip_export_of_resnet_and_siglip_models(cfg, suffix, tmp_path, open_clip):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    perturb_(model)
    out = tmp_path / f"export-{cfg.vision.arch}{suffix}"
    config_path, name = export_open_clip(model.state_dict(), cfg, out)
    assert name is None and config_path == out.with_suffix(".json")
    open_clip.add_model_config(config_path)
    exported = open_clip.create_model(config_path.stem, pretrained=str(out)).eval()

    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    tokens = random_tokens(3, cfg.text, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(images), model.encode_image(images, normalize=False), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
        torch.testing.assert_close(exported.encode_text(tokens), model.encode_text(tokens, normalize=False), atol=1e-5, rtol=0, msg="float32, atol 1e-5")
    assert exported.logit_scale.item() == model.logit_scale.item()
    if cfg.init_logit_bias is not None:
        assert exported.logit_bias.item() == model.logit_bias.item()
    if cfg.vision.arch == "resnet":  # BatchNorm running statistics travel too
        assert torch.equal(exported.visual.bn1.running_var, model.visual.bn1.running_var)


def test_builtin_names_are_open_clips_configs(open_clip):
    for name, config in BUILTIN_CONFIGS.items():
        assert open_clip.get_model_config(name) == config, name
    recipes = {"vitb32": "ViT-B-32-quickgelu", "vitb16": "ViT-B-16-quickgelu", "vitl14": "ViT-L-14-quickgelu", "rn50": "RN50-quickgelu", "rn101": "RN101-quickgelu", "rn50x4": "RN50x4-quickgelu", "vit_tiny": None, "rn_tiny": None}
    for recipe, name in recipes.items():
        assert builtin_name(open_clip_model_cfg(load_config([f"model={recipe}"])[0].model)) == name, recipe
        gelu = builtin_name(open_clip_model_cfg(load_config([f"model={recipe}", "model.act=gelu"])[0].model))
        assert gelu == (name and name.removesuffix("-quickgelu")), f"{recipe} model.act=gelu"


def write_run_info(run_dir: Path, overrides: list) -> None:
    """The part of <run>/run_info.json the export reads: the resolved config (clipdist.log writes it)."""
    run_dir.mkdir(parents=True)
    (run_dir / "run_info.json").write_text(json.dumps({"config": load_config(overrides)[1]}))


def test_cli_errors_are_one_line(tmp_path, capsys):
    resnet_run = tmp_path / "rn"
    write_run_info(resnet_run, ["+experiment=digits"])
    result = subprocess.run(
        [sys.executable, "-m", "clipdist.export", str(resnet_run), "--to", "hf", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "clipdist.export: error: HF CLIPModel has no ModifiedResNet vision tower; use --to open_clip"

    cases = {
        (str(resnet_run), "--to", "open_clip", "x.pt"): f"{resnet_run}: no checkpoint ({resnet_run}/checkpoints/latest is missing)",
        (str(tmp_path), "--to", "open_clip", "x.pt"): f"{tmp_path}/run_info.json not found: pass the run's Hydra overrides instead, e.g. --override +experiment=digits",
    }
    for argv, expected in cases.items():
        assert export_main(list(argv)) == 2
        assert capsys.readouterr().err == f"clipdist.export: error: {expected}\n"


@pytest.mark.slow
def test_cli_refuses_a_config_that_does_not_fit_the_checkpoint(pretrained_runs, tmp_path, capsys):
    run_dir = pretrained_runs[3][3]  # the ZeRO-3 run
    assert export_main([str(run_dir), "--to", "open_clip", str(tmp_path / "x.pt"), "--override", "+experiment=digits"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"clipdist.export: error: {run_dir}/checkpoints/step_00000000 does not fit model config 'RN-tiny': shape of visual.conv1.weight: checkpoint [128, 3, 8, 8], model [8, 3, 3, 3] (and ")
    assert error.count("\n") == 1
    assert export_main([str(run_dir), "--to", "open_clip", str(tmp_path / "x.json")]) == 2
    assert "the weights file needs another suffix (.pt, .safetensors)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_reads_a_zero3_checkpoint_as_export_does(pretrained_runs, digits):
    """python -m clipdist.evaluate train.resume=<ZeRO-3 checkpoint> merges the partitions with
    export's loader and scores open_clip's weights: its zero-shot metrics equal those of the
    reference (open_clip's state dict loaded directly, evaluated in this process) exactly, as
    both compute in float32 on one thread from the same weights and images. A model config that
    does not fit the checkpoint is the same one-line error as export's."""
    from clipdist.engine.checkpoint_weights import CheckpointError
    from clipdist.eval import EvalShape, run_evals
    from clipdist.evaluate import load_model
    from conftest import free_port

    _, expected, _, run_dirs = pretrained_runs
    checkpoint = run_dirs[3] / "checkpoints" / "step_00000000"
    eval_dir = run_dirs[3].parent / "eval_zero3"
    overrides = ["+experiment=tiny", f"eval.zero_shot.0.urls='{digits}/eval-{{000000..000001}}.tar'", "eval.retrieval=[]", "data.generate_digits=false"]
    command = [sys.executable, "-m", "clipdist.evaluate", *overrides, f"train.resume={checkpoint}", f"train.output_dir={eval_dir}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, f"evaluate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    written = json.loads((eval_dir / "eval.json").read_text())
    assert written["weights"] == f"checkpoint {checkpoint}"

    cfg, _ = load_config(overrides)
    model = build_model(cfg.model)
    model.load_state_dict(expected)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the evaluate process (OMP_NUM_THREADS=1)
    try:
        shape = EvalShape(cfg.model.vision.image_size, cfg.model.text.context_length, rank=0, world_size=1, device=torch.device("cpu"))
        reference = run_evals(cfg.eval, model.eval(), shape)
    finally:
        torch.set_num_threads(threads)
    assert written["metrics"] == reference.metrics and written["metrics"]["eval/digits/count"] == 300
    assert written["per_class_top1"] == {"digits": reference.per_class["digits"]}

    digits_cfg, _ = load_config(["+experiment=digits", f"train.resume={checkpoint}"])
    with pytest.raises(CheckpointError, match=rf"^{checkpoint} does not fit model config 'RN-tiny': shape of visual.conv1.weight"):
        load_model(digits_cfg)
