"""python -m clipdist.report: PNGs and report.md from a run's metrics.jsonl."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import torchrun
from PIL import Image

from clipdist.config import LoggingConfig
from clipdist.log import MetricLogger
from clipdist.report import DPI, FIGSIZE, merge_steps, write_report

BATCH = 64


def loss_at(step: int, launch: int = 0) -> float:
    """A falling loss; a resumed launch (launch=1) differs, so the report shows whose values it kept."""
    return 4.0 * math.exp(-step / 20) + 0.5 + 0.01 * launch


def train_row(step: int, launch: int = 0) -> dict:
    return {
        "train/loss": loss_at(step, launch),
        "train/lr": 1e-3 * min(1.0, step / 5),
        "train/logit_scale": 14.3 + 0.1 * step,
        "train/global_batch": float(BATCH),
        "data/epoch": float(step // 25),
        "data/rows": float(step * BATCH),
        "data/mix/laion": 0.7,
        "data/mix/cc12m": 0.3,
        "data/skipped/bad_image": float(step // 10),
        "data/skipped/padded": float(step // 10),
    }


def eval_row(step: int) -> dict:
    top1 = {10: 0.30, 20: 0.55, 30: 0.61, 40: 0.58}[step]  # best at step 30, not the last
    return {
        "eval/digits/top1": top1,
        "eval/digits/top5": min(1.0, top1 + 0.3),
        "eval/digits/count": 300.0,
        "eval/imagenet_v2/top1": top1 / 2,
        "eval/imagenet_v2/top5": top1,
        "eval/coco/image_to_text_R@1": top1 / 3,
        "eval/coco/text_to_image_R@1": top1 / 4,
    }


def log_launch(run_dir: Path, steps: range, launch: int) -> None:
    """What train_loop logs: a row per step, eval rows every 10 steps (no samples_seen given)."""
    logger = MetricLogger(LoggingConfig(run_name="synthetic", wandb_mode="disabled"), run_dir, {"logging": {"run_name": "synthetic"}}, rank=0, resuming=launch > 0)
    for step in steps:
        logger.log(train_row(step, launch), step, samples_seen=step * BATCH)
        if step % 10 == 0:
            logger.log(eval_row(step), step)
    logger.close()


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)), (path, image.size)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 10, f"{path.name} looks blank: {len(colors)} colours"


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """Launch 1 logs steps 1..35 with a checkpoint at 30, and dies; launch 2 resumes at 30."""
    run_dir = tmp_path_factory.mktemp("run")
    log_launch(run_dir, range(1, 36), launch=0)
    log_launch(run_dir, range(31, 41), launch=1)
    return run_dir


def test_resumed_steps_keep_the_resumed_launchs_values(resumed_run):
    rows = [json.loads(line) for line in (resumed_run / "metrics.jsonl").read_text().splitlines()]
    assert sum(row["step"] == 33 for row in rows) == 2  # step 33 logged by both launches
    merged = merge_steps(rows)
    assert [row["step"] for row in merged] == list(range(1, 41))
    assert merged[32]["train/loss"] == loss_at(33, launch=1)
    assert merged[29]["train/loss"] == loss_at(30, launch=0) and merged[29]["eval/digits/top1"] == 0.61
    assert all(row["train/samples_seen"] == row["step"] * BATCH for row in merged)


def test_report_command_writes_pngs_and_summary(resumed_run, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "clipdist.report", str(resumed_run), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "report.md")
    for name in ("loss.png", "lr.png", "logit_scale.png", "zero_shot.png", "retrieval.png", "data.png"):
        assert_png(out / name)

    report = (out / "report.md").read_text()
    for expected in (
        "# Run `synthetic`",
        "| steps | 40 |",
        f"| samples seen | {40 * BATCH:,} |",
        f"| final loss | {loss_at(40, launch=1):.4g} |",
        # best is step 30's, final is step 40's
        f"| digits | top1 | 61.00 % at {30 * BATCH:,} samples (step 30) | 58.00 % |",
        "| imagenet_v2 | top5 | 61.00 % at",
        "| coco | image_to_text_R@1 | 20.33 % at",
        "- rows replaced: bad_image 4, padded 4",
        "- mix: cc12m 30.0 %, laion 70.0 %",
        "![training loss](loss.png)",
        "![zero-shot accuracy](zero_shot.png)",
    ):
        assert expected in report, f"{expected!r} not in report.md:\n{report}"


def test_older_eval_names_and_runs_without_eval(tmp_path):
    """eval/zero_shot_top1 (before eval sets had names) still plots; no eval at all is said."""
    old, plain = tmp_path / "old", tmp_path / "plain"
    for run_dir, with_eval in ((old, True), (plain, False)):
        logger = MetricLogger(LoggingConfig(wandb_mode="disabled"), run_dir, {}, rank=0)
        for step in (1, 2):
            logger.log({"train/loss": 3.0 / step, "train/samples_seen": 32 * step}, step)
        if with_eval:
            logger.log({"eval/zero_shot_top1": 0.9, "eval/zero_shot_top5": 1.0, "eval/zero_shot_count": 300}, 2)
        logger.close()

    report = write_report(old).read_text()
    assert_png(old / "report" / "zero_shot.png")
    assert "| zero_shot | top1 | 90.00 % at 64 samples (step 2) | 90.00 % |" in report

    report = write_report(plain).read_text()
    assert not (plain / "report" / "zero_shot.png").exists() and not (plain / "report" / "data.png").exists()
    assert "No zero-shot eval metrics logged" in report and "No `train/lr` logged" in report


def test_report_errors_name_the_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clipdist.report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"clipdist.report: {tmp_path / 'metrics.jsonl'}: no such file (is this a clipdist run directory?)"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        write_report(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_on_a_real_training_run(tmp_path, digits):
    """3 steps of +experiment=tiny on 2 ranks with an offline wandb run: every row, eval rows
    included, carries samples seen; run_info.json has the world size; the report draws it all."""
    rows = torchrun(tmp_path, digits, "train.max_steps=3", "logging.wandb_mode=offline")
    assert rows and all(row["train/samples_seen"] == row["step"] * 32 for row in rows)
    assert any(key.startswith("eval/") for key in rows[-1])
    assert json.loads((tmp_path / "run_info.json").read_text())["world_size"] == 2
    report = write_report(tmp_path).read_text()
    for name in ("loss.png", "lr.png", "logit_scale.png", "zero_shot.png", "data.png"):
        assert_png(tmp_path / "report" / name)
    assert "| steps | 3 |" in report and "| samples seen | 96 |" in report
