"""The eval-only entry point and the eval suite: zero-shot and retrieval on the real digits eval
shards give the same numbers on 2 gloo ranks (torchrun) as in one process; the digits eval
captions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from clipdist.config import load_config
from clipdist.data.digits import DIGIT_CLASSNAMES, FORMAT_VERSION, TRAIN_TEMPLATES, ensure_digits_shards, eval_captions, train_caption
from clipdist.data.pipeline import iter_shard
from clipdist.eval import EvalShape, run_evals
from clipdist.eval.retrieval_data import decode_captions
from clipdist.evaluate import main as evaluate_main
from clipdist.export import export_open_clip
from clipdist.models import build_model



def eval_overrides(digits) -> list[str]:
    shards = f"'{digits}/eval-{{000000..000001}}.tar'"
    return ["+experiment=tiny", f"eval.zero_shot.0.urls={shards}", f"eval.retrieval.0.urls={shards}", "data.generate_digits=false"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_equals_one_process(tmp_path, digits):
    # Reference: run_evals in this process (world size 1, no process group) on the same weights.
    # Exact: every image and prompt is embedded in a full batch on both sides, the class
    # embeddings and counts are reduced exactly, and retrieval ties are resolved by a tolerance.
    overrides = eval_overrides(digits)
    cfg, _ = load_config(overrides)
    torch.manual_seed(3)
    model = build_model(cfg.model)
    weights = tmp_path / "weights.pt"
    export_open_clip(model.state_dict(), cfg.model, weights)  # with weights.json, which states the activation

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clipdist.evaluate",
        *overrides, f"model.pretrained={weights}", f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, f"evaluate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    written = json.loads((tmp_path / "run" / "eval.json").read_text())

    torch.set_num_threads(1)  # as the torchrun ranks
    shape = EvalShape(cfg.model.vision.image_size, cfg.model.text.context_length, rank=0, world_size=1, device=torch.device("cpu"))
    single = run_evals(cfg.eval, model, shape)

    assert written["world_size"] == 2 and written["weights"] == f"model.pretrained={weights}"
    assert written["metrics"] == single.metrics
    assert written["per_class_top1"] == {"digits": single.per_class["digits"]}
    metrics = written["metrics"]
    assert metrics["eval/digits/count"] == metrics["eval/digits/images"] == 300 and metrics["eval/digits/captions"] == 900
    assert set(metrics) == {
        f"eval/digits/{name}"
        for name in ["top1", "top5", "per_class_top1", "count", "images", "captions"]
        + [f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    }
    table = [line.split() for line in result.stdout.splitlines()]
    assert ["digits", "top1", f"{100 * metrics['eval/digits/top1']:.2f}", "%"] in table, result.stdout


def test_nothing_to_evaluate_is_a_config_error(capsys):
    assert evaluate_main(["data=webdataset"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["clipdist: config error: eval.zero_shot: nothing to evaluate (eval.zero_shot and eval.retrieval are both empty)"]


@pytest.mark.parametrize("resume", ["latest", "not_a_checkpoint"])
def test_a_resume_that_names_no_checkpoint_is_a_config_error(tmp_path, digits, capsys, resume):
    """The weights train.resume names are checked with the config, before any process group."""
    (tmp_path / "empty").mkdir()
    says = {"latest": f"train.resume=latest: no checkpoint in {tmp_path}/checkpoints (missing {tmp_path}/checkpoints/latest)",
            "not_a_checkpoint": f"train.resume: {tmp_path}/empty is not a clipdist checkpoint (it has no data/rank00000.json)"}
    value = "latest" if resume == "latest" else tmp_path / "empty"
    assert evaluate_main([*eval_overrides(digits), f"train.output_dir={tmp_path}", f"train.resume={value}"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"clipdist: config error: {says[resume]}"]


def test_digits_eval_captions_are_neither_training_captions_nor_prompts(digits):
    cfg, _ = load_config(["+experiment=digits"])
    (zero_shot,) = cfg.eval.zero_shot
    prompts = {template.format(name) for template in zero_shot.templates for name in DIGIT_CLASSNAMES}
    training = {train_caption(label, t) for label in range(10) for t in range(len(TRAIN_TEMPLATES))}
    shard = next(iter_shard(f"{digits}/eval-000000.tar"))
    captions = decode_captions(shard)
    label = int(shard["cls"])
    assert captions == eval_captions(label) and len(set(captions)) == 3
    all_eval = {caption for label in range(10) for caption in eval_captions(label)}
    assert not all_eval & training and not all_eval & prompts


def test_stale_digits_shards_are_rewritten(tmp_path, digits):
    # Shards of an older format (here: an older version mark) are rewritten, byte for byte as new.
    stale = tmp_path / "digits"
    shutil.copytree(digits, stale)
    (stale / "digits-version.json").write_text('{"version": 1}')
    (stale / "eval-000000.tar").write_bytes(b"old")
    ensure_digits_shards(str(stale))
    assert json.loads((stale / "digits-version.json").read_text()) == {"version": FORMAT_VERSION}
    for name in ("eval-000000.tar", "eval-000001.tar", "train-000003.tar"):
        assert (stale / name).read_bytes() == (digits / name).read_bytes(), name
