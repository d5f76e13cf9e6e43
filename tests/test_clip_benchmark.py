"""clip_benchmark with no glue: a trained digits run, exported with ``--to open_clip``, scored by
LAION's real ``clip_benchmark eval`` CLI (1.6.2, the test extra) on the digits eval set written
in clip_benchmark's WebDataset layout, gives clipdist's own zero-shot numbers; and clipdist's
eval reads that layout (``root``, ``{c}`` templates) as it reads its own shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipdist.config import ConfigError, EvalConfig, ZeroShotSetConfig, expand_urls, load_config
from clipdist.data import wds_layout
from clipdist.data.sources import iter_shard
from clipdist.eval import EvalShape, build_classifier, run_evals
from clipdist.eval.sets import resolve_templates, resolve_zero_shot_set
from clipdist.evaluate import main as evaluate_main
from clipdist.export import load_run_model, open_clip_model_cfg
from clipdist.export.__main__ import main as export_main
from clipdist.export.open_clip import open_clip_preprocess_cfg
from clipdist.models import build_model, tokenize

# Under NumPy >= 2.4 clip_benchmark 1.6.2's accuracy() fails (float() of a one-element array);
# this folder's sitecustomize.py swaps in the same computation for the clip_benchmark process.
NUMPY_SHIM = Path(__file__).resolve().parent / "clip_benchmark_numpy_shim"


def digits_eval_set(digits: Path) -> ZeroShotSetConfig:
    """conf/data/digits.yaml's zero-shot set (its '{}' templates) on the ``digits`` fixture's eval shards."""
    eval_set = load_config(["+experiment=digits"])[0].eval.zero_shot[0]
    return ZeroShotSetConfig(**{**eval_set.__dict__, "urls": f"{digits}/eval-{{000000..000001}}.tar"})


def zero_shot_metrics(model: torch.nn.Module, image_size: int, context_length: int, eval_set: ZeroShotSetConfig) -> dict:
    """clipdist's evaluation of ``eval_set`` in this process (world size 1, float32 on the CPU)."""
    shape = EvalShape(image_size, context_length, rank=0, world_size=1, device=torch.device("cpu"))
    return run_evals(EvalConfig(zero_shot=[eval_set], local_batch=128), model, shape).metrics


@pytest.fixture(scope="module")
def layout_root(tmp_path_factory, digits) -> Path:
    """The digits eval set in clip_benchmark's layout, written by the CLI users run."""
    root = tmp_path_factory.mktemp("wds_digits")
    overrides = ["+experiment=digits", "data.generate_digits=false", f"eval.zero_shot.0.urls='{digits}/eval-{{000000..000001}}.tar'"]
    assert wds_layout.main(["--out", str(root), *overrides]) == 0
    return root


def test_digits_set_written_in_clip_benchmarks_layout_reads_back(layout_root, digits):
    # What clip_benchmark's build_wds_dataset reads: test/nshards.txt, test/{0..N-1}.tar, the
    # class names and '{c}' templates, one per line.
    original = digits_eval_set(digits)
    nshards = int((layout_root / "test" / "nshards.txt").read_text())
    assert nshards == wds_layout.MIN_SHARDS == 4, "the 2 digits shards are split for clip_benchmark's 4 default loader workers"
    assert sorted(p.name for p in (layout_root / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar", "3.tar"]
    assert (layout_root / "classnames.txt").read_text().splitlines() == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    templates = (layout_root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == [t.replace("{}", "{c}") for t in original.templates] and all("{c}" in t for t in templates)

    resolved = resolve_zero_shot_set(ZeroShotSetConfig(name="digits", root=str(layout_root)), "eval.zero_shot[0]")
    assert resolved.urls == f"{layout_root}/test/{{0..3}}.tar"
    assert resolved.templates == templates

    # The same 300 samples, in the same order, as clipdist's own shards.
    laid_out = list(samples(resolved.urls))
    assert laid_out == list(samples(original.urls)) and len(laid_out) == 300

    # '{c}' is filled as '{}': a random model's classifier from the layout's templates is the one
    # from clipdist's, bit for bit. (The trained model's scores on the layout: the test below.)
    cfg, _ = load_config(["+experiment=digits"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()

    def classifier(templates: list[str]) -> torch.Tensor:
        return build_classifier(model, tokenize, resolved.classnames, templates, "cpu", context_length=cfg.model.text.context_length)

    assert torch.equal(classifier(resolved.templates), classifier(original.templates))


def samples(urls: str):
    """(key, image bytes, label) of every sample, in URL order."""
    return ((sample["__key__"], sample["png"], sample["cls"]) for url in expand_urls(urls) for sample in iter_shard(url))


def test_layout_root_in_the_config_and_its_errors(layout_root, tmp_path, capsys):
    cfg, _ = load_config(["+experiment=digits", f"eval.zero_shot=[{{name: digits, root: '{layout_root}'}}]", "eval.retrieval=[]"])
    assert cfg.eval.zero_shot[0].root == str(layout_root) and cfg.eval.zero_shot[0].urls == ""

    def evaluate_error(eval_set: str) -> str:
        """python -m clipdist.evaluate's answer: exit code 2 and one line on stderr."""
        assert evaluate_main(["data=webdataset", f"eval.zero_shot=[{eval_set}]"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        return line

    assert evaluate_error(f"{{name: d, root: '{tmp_path}'}}") == (
        f"clipdist: config error: eval.zero_shot[0].root: no {tmp_path}/test/nshards.txt (No such file or directory); "
        "expected clip_benchmark's layout: test/nshards.txt, test/0.tar.., classnames.txt, zeroshot_classification_templates.txt"
    )
    both = evaluate_error(f"{{name: d, root: '{layout_root}', urls: '{layout_root}/test/0.tar'}}")
    assert both.startswith("clipdist: config error: eval.zero_shot[0].urls: give urls or root, not both"), both

    assert resolve_templates(["a {c}.", "the {} digit"], "k") == ["a {c}.", "the {} digit"]
    for template in ("a {name}", "a {c} by {author}"):
        with pytest.raises(ConfigError, match=r"^k\[0\]: every template needs a '\{\}' \(or clip_benchmark's '\{c\}'\) placeholder and no other"):
            resolve_templates([template], "k")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_clip_benchmark_scores_the_export_as_clipdist_does(quickstart_ring_run, layout_root, tmp_path, capsys):
    digits_run = quickstart_ring_run  # the trained digits quickstart (conftest.py)
    pytest.importorskip("clip_benchmark", reason="clip_benchmark (test extra) is the independent reference; it does not import here")
    out = tmp_path / "exported" / "digits.pt"
    assert export_main([str(digits_run), "--to", "open_clip", str(out)]) == 0
    local_dir = tmp_path / "exported" / "digits"
    assert f"wrote {local_dir}/ (open_clip local-dir)" in capsys.readouterr().out
    cfg, model = load_run_model(digits_run)
    written = json.loads((local_dir / "open_clip_config.json").read_text())
    assert written == {"model_cfg": open_clip_model_cfg(cfg), "preprocess_cfg": open_clip_preprocess_cfg(cfg)}
    assert written["model_cfg"] == json.loads(out.with_suffix(".json").read_text())
    assert (local_dir / "open_clip_pytorch_model.bin").samefile(out), "the weights are linked, not stored twice"

    # The command as a user types it (with --output: clip_benchmark names its result file after
    # the model, and a '/' in local-dir:PATH makes that name a folder that does not exist).
    # --no_amp: float32, as clipdist evaluates. CUDA hidden: on a GPU machine, still the CPU.
    command = [
        str(Path(sys.executable).parent / "clip_benchmark"), "eval", "--model", f"local-dir:{local_dir}", "--pretrained", "",
        "--dataset", "wds/digits", "--dataset_root", str(layout_root), "--no_amp", "--output", str(tmp_path / "result.json"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(NUMPY_SHIM), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"clip_benchmark failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    benchmark = json.loads((tmp_path / "result.json").read_text())["metrics"]

    # Exact, not approximate: both score the same 300 PNGs with the same preprocessing (the
    # exported preprocess_cfg is clip_preprocess, test_export.py), the same token ids, class names
    # and templates ('{c}' and '{}' fill alike), and the same float32 weights; what differs is the
    # batching, which moves logits by float32 rounding (~1e-7), far less than any top-1 margin of
    # a trained model, so not one prediction changes.
    ours = zero_shot_metrics(model, cfg.vision.image_size, cfg.text.context_length, ZeroShotSetConfig(name="digits", root=str(layout_root)))
    summary = json.loads((digits_run / "summary.json").read_text())
    assert ours["eval/digits/count"] == 300 and ours["eval/digits/top1"] > 0.5, ours  # trained: chance is 0.1
    assert benchmark["acc1"] == ours["eval/digits/top1"] == summary["zero_shot_top1"], (benchmark, ours, summary)
    assert benchmark["acc5"] == ours["eval/digits/top5"]
    # clip_benchmark's balanced accuracy is the mean per-class recall: the same quantity, summed
    # in another order (1e-12).
    assert benchmark["mean_per_class_recall"] == pytest.approx(ours["eval/digits/per_class_top1"], abs=1e-12, rel=0)
