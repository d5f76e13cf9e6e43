"""clipdist as a wheel: built from this checkout, installed (not editable) into a fresh venv, and
run from an empty directory, as in a cluster's container image or after `pip install git+...`.

The fresh venv borrows the heavy dependencies (torch, deepspeed ...) from the test venv through a
path entry, not an install: they come from the package index either way, and copying 6 GB would
cost minutes. clipdist itself, its configs and its console scripts come from the wheel alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import TRAIN_ENV

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPTS = ("clipdist-train", "clipdist-evaluate", "clipdist-export", "clipdist-report", "clipdist-write-shards", "clipdist-sweep", "clipdist-index", "clipdist-wds-layout", "clipdist-plan")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what the build reads: setuptools builds in place (build/), and a
    stale build/ in the checkout could put deleted modules into the wheel."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("clipdist", "conf"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(dist), str(source)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    (built,) = dist.glob("clipdist-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; its bin/ directory."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    site_packages = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    # A plain path line: the test venv's own .pth files (its editable clipdist) stay unprocessed.
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--no-deps", "--no-index", "--quiet", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True, timeout=300)
    return env_dir / "bin"


def test_wheel_carries_every_module_config_and_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "clipdist").rglob("*.py")}
    configs = {"clipdist/conf/" + str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert modules and configs and not (modules | configs) - names, sorted((modules | configs) - names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{script} = " in scripts for script in CONSOLE_SCRIPTS), scripts


def test_installed_wheel_trains_from_an_empty_directory(installed, tmp_path):
    """`clipdist-train +experiment=digits train.max_steps=2` on 2 ranks, then `python -m
    clipdist.train` under torchrun resumes it: both from the wheel, in a directory holding
    nothing (the digits shards are written there on first use), with a user's own experiment
    found through Hydra's --config-dir."""
    env = {**os.environ, **TRAIN_ENV, "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    python = str(installed / "python")

    def run(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    where = run(python, "-c", "import clipdist, clipdist.config as c; print(clipdist.__file__, c.CONF_DIR, clipdist.__version__)").stdout.split()
    assert all(Path(p).is_relative_to(installed.parent) for p in where[:2]), where  # not this checkout
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run(*torchrun, "--no-python", str(installed / "clipdist-train"), "+experiment=digits", "train.max_steps=2", "eval.retrieval=[]")
    run_dir = tmp_path / "runs" / "digits"
    first = json.loads((run_dir / "summary.json").read_text())
    assert (first["steps"], first["world_size"]) == (2, 2) and first["zero_shot_count"] == 300
    run_info = json.loads((run_dir / "run_info.json").read_text())
    assert run_info["versions"]["clipdist"] == where[2] and run_info["git"] is None  # the wheel, not a checkout

    mine = tmp_path / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - digits\ntrain:\n  max_steps: 3\n")
    run(*torchrun, "-m", "clipdist.train", "--config-dir", "my_configs", "+experiment=mine", "train.resume=latest", "eval.zero_shot=[]", "eval.retrieval=[]")
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["steps"] == 3 and (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
