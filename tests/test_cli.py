"""The command line of every Hydra app: --help, --cfg job, --info, --config-dir, hydra.run.dir,
--version; config errors stay one line with exit status 2 (also under -m). The multirun that
reaches the submitit launcher runs in tests/test_slurm.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import clipdist
from clipdist.config import load_config

from conftest import TRAIN_ENV

ROOT = Path(__file__).resolve().parent.parent


def clipdist_train(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "clipdist.train", *arguments]
    return subprocess.run(command, cwd=cwd, env={**TRAIN_ENV, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)


@pytest.fixture
def my_configs(tmp_path) -> Path:
    """A user's own config folder with an experiment built on a clipdist recipe."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - digits\ntrain:\n  max_steps: 7\nlogging:\n  run_name: mine\n")
    return tmp_path


def test_help_lists_the_config_groups_and_options():
    result = clipdist_train("--help")
    assert result.returncode == 0, result.stderr
    assert "experiment: digits, lit_vitb32, rn50, tiny" in result.stdout
    assert "loss: gather, ring, siglip" in result.stdout
    assert "== Config ==" in result.stdout and "warmup_steps: 100" in result.stdout


def test_cfg_job_prints_the_resolved_config_of_the_run(my_configs, tmp_path):
    """What `--cfg job` prints is what a run would use (clipdist's own composition as the
    reference), with hydra.run.dir as the run's directory, and a user's --config-dir experiment."""
    overrides = ["+experiment=mine", "optim.lr=1e-3", f"hydra.run.dir={tmp_path}/where"]
    result = clipdist_train("--cfg", "job", "--config-dir", str(my_configs), *overrides)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    _, reference = load_config(overrides, extra_config_dir=str(my_configs))
    assert printed == reference
    assert printed["train"]["output_dir"] == f"{tmp_path}/where" and printed["train"]["max_steps"] == 7


def test_info_shows_the_search_path_with_a_users_config_dir(my_configs):
    result = clipdist_train("--info", "searchpath", "--config-dir", str(my_configs))
    assert result.returncode == 0, result.stderr
    assert f"file://{my_configs}" in result.stdout and "file://" + str(ROOT / "conf") in result.stdout


def test_version_names_clipdist():
    result = clipdist_train("--version")
    assert result.returncode == 0 and result.stdout.startswith(f"clipdist {clipdist.__version__} (Hydra "), result.stdout


def test_run_directory_rule(my_configs):
    """train.output_dir decides; its default is hydra.run.dir, whose default is runs/<run_name>."""
    run_dir = lambda *overrides: load_config(["+experiment=mine", *overrides], extra_config_dir=str(my_configs))[0].train.output_dir
    assert run_dir() == "runs/mine"
    assert run_dir("hydra.run.dir=/scratch/a") == "/scratch/a"
    assert run_dir("hydra.run.dir=/scratch/a", "train.output_dir=/scratch/b") == "/scratch/b"
    # Hydra's standard way to add config folders works as well as --config-dir.
    by_searchpath, _ = load_config(["+experiment=mine", f"hydra.searchpath=[file://{my_configs}]"])
    assert by_searchpath.train.max_steps == 7


@pytest.mark.parametrize(
    "arguments, says",
    [
        (["+experiment=digits", "optim.lrr=1"], "optim.lrr: Key 'lrr' not in 'OptimConfig'"),
        (["--cfg", "job", "optim.lrr=1"], "optim.lrr: Key 'lrr' not in 'OptimConfig'"),
        (["-m", "+experiment=digits", "optim.lr=1e-3,2e-3", "optim.lrr=1,2"], "optim.lrr: Key 'lrr' not in 'OptimConfig'"),
        (["--config-dir", "/nonexistent/confs", "+experiment=digits"], "--config-dir: no such directory: /nonexistent/confs"),
    ],
    ids=["run", "cfg", "multirun", "config-dir"],
)
def test_config_errors_stay_one_line_with_status_2(arguments, says):
    result = clipdist_train(*arguments)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"clipdist: config error: {says}"], result.stderr
