"""MetricLogger against a real offline wandb run: samples-seen axis, run info, and no secrets."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from clipdist.config import LoggingConfig, load_config
from clipdist.log import PACKAGE_ROOT, MetricLogger, git_state, redact, redact_config

# What a user might put in a run's config or environment; none of it may reach the run directory.
ENV_TOKEN = "hf_envtoken0123456789abcdef"  # resolved into the config through ${oc.env:...}
URL_PASSWORD = "urlpass-5f1e2d3c"
PRESIGNED_SIGNATURE = "sigvalue-a1b2c3d4"
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
SECRETS = (ENV_TOKEN, URL_PASSWORD, PRESIGNED_SIGNATURE, WANDB_KEY)


def wandb_records(run_dir: Path):
    """The records of the run's offline .wandb file (a LevelDB-style log of protobuf records:
    7-byte file header, 32 KiB blocks, each chunk behind a crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"unknown .wandb header {data[:7]!r}"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def expected_commit():
    """The checkout's commit, asked of git independently of clipdist.log; None outside a checkout."""
    try:
        top = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        if Path(top.stdout.strip()).resolve() != PACKAGE_ROOT:
            return None
        return subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def test_offline_wandb_run_plots_against_samples_seen_and_records_no_secret(tmp_path, monkeypatch):
    """A real offline wandb run: every metrics.jsonl row and wandb history row carries
    train/samples_seen (the eval row too, from the last value), wandb's x axis is
    train/samples_seen, the commit and world size are in the wandb config and run_info.json,
    and no secret from the config, the command line or the environment is in any file written."""
    monkeypatch.setenv("CLIPDIST_TEST_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    train_urls = "::".join([
        "pipe:curl -s -H 'Authorization: Bearer ${oc.env:CLIPDIST_TEST_TOKEN}' https://hf.example/d/{0..3}.tar",
        f"https://alice:{URL_PASSWORD}@host/e.tar",
        f"https://h.example/e1.tar?X-Amz-Signature={PRESIGNED_SIGNATURE}&x=1",
    ])  # fmt: skip
    overrides = [f'data.train_urls="{train_urls}"']
    cfg, resolved = load_config(overrides)
    assert all(secret in resolved["data"]["train_urls"] for secret in (ENV_TOKEN, URL_PASSWORD, PRESIGNED_SIGNATURE))
    monkeypatch.setattr(sys, "argv", ["clipdist/train.py", *overrides, f"+logging.api_key={WANDB_KEY}"])
    cfg.logging.wandb_mode = "offline"
    run_dir = tmp_path / "run"

    logger = MetricLogger(cfg.logging, run_dir, resolved, rank=0, world_size=2)
    for step in (1, 2, 3):
        logger.log({"train/loss": 4.0 - step, "train/lr": 1e-3 * step}, step, samples_seen=32 * step)
    logger.log({"eval/digits/top1": 0.5, "eval/digits/top5": 0.9}, 3)  # an eval row names no samples_seen
    logger.summary({"final_loss": 1.0, "url": train_urls})
    logger.close()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/samples_seen"]) for r in rows] == [(1, 32), (2, 64), (3, 96), (3, 96)]
    assert rows[-1]["eval/digits/top1"] == 0.5

    commit = expected_commit()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert (info["git"] or {}).get("commit") == commit
    assert info["config"]["data"]["train_urls"] == (
        "pipe:curl -s -H 'Authorization: Bearer ***' https://hf.example/d/{0..3}.tar"
        "::https://***@host/e.tar::https://h.example/e1.tar?X-Amz-Signature=***&x=1"
    )

    records = list(wandb_records(run_dir))
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "train/samples_seen" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "train/samples_seen" for m in metrics)
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert config["run_info"]["world_size"] == 2 and (config["run_info"]["git"] or {}).get("commit") == commit
    assert config["data"]["train_urls"] == info["config"]["data"]["train_urls"]
    histories = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["train/samples_seen"] for h in histories] == [32, 64, 96]  # eval merged into step 3's row
    assert histories[-1]["eval/digits/top1"] == 0.5

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) >= 4, files  # metrics.jsonl, run_info.json, the .wandb log, wandb's own logs
    for path in files:
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, f"{secret} written to {path.relative_to(run_dir)}"


def test_redact_removes_credentials_and_keeps_ordinary_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2-long-enough")
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to search for: would mangle every "1"
    cases = {
        "pipe:curl -s https://user:pw@host/{00..09}.tar": "pipe:curl -s https://***@host/{00..09}.tar",
        "https://ghp_abcdef@github.com/org/repo.git": "https://***@github.com/org/repo.git",
        "pipe:AWS_SECRET_ACCESS_KEY=abc AWS_ACCESS_KEY_ID=AKIA1 aws s3 cp s3://b/0.tar -": "pipe:AWS_SECRET_ACCESS_KEY=*** AWS_ACCESS_KEY_ID=*** aws s3 cp s3://b/0.tar -",
        "https://h/x.tar?X-Amz-Credential=AKIA/1&X-Amz-Signature=dead&sig=beef&n=1": "https://h/x.tar?X-Amz-Credential=***&X-Amz-Signature=***&sig=***&n=1",
        "curl -u bob:pw -H 'Authorization: Bearer abc.def' --hf-token=xyz u": "curl -u *** -H 'Authorization: Bearer ***' --hf-token=*** u",
        "login hunter2-long-enough 1": "login *** 1",
        # Not secrets: shard patterns, overrides whose names merely contain "key", interpreter flags.
        "s3://bucket/{00000..41407}.tar": "s3://bucket/{00000..41407}.tar",
        "data.record_keys=true": "data.record_keys=true",
        "python -u train.py": "python -u train.py",
    }
    for text, expected in cases.items():
        assert redact(text) == expected, text
    config = {"logging": {"api_key": "k", "project": "p"}, "data": {"sources": [{"urls": "https://u:p@h/x.tar", "weight": 1.0}]}, "n": None}
    assert redact_config(config) == {
        "logging": {"api_key": "***", "project": "p"},
        "data": {"sources": [{"urls": "https://***@h/x.tar", "weight": 1.0}]},
        "n": None,
    }


def test_git_state_is_none_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) is None  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    assert git_state(PACKAGE_ROOT) is None


def test_rows_carry_samples_seen_and_a_resumed_run_keeps_earlier_launches(tmp_path, monkeypatch):
    cfg = LoggingConfig(wandb_mode="disabled")
    logger = MetricLogger(cfg, tmp_path, {"train": {"max_steps": 4}}, rank=0, world_size=1)
    with pytest.raises(ValueError, match="train/samples_seen"):
        logger.log({"eval/digits/top1": 0.1}, 0)  # nothing says how many samples were seen yet
    logger.log({"train/loss": 2.0, "train/samples_seen": 16}, 1)
    logger.log({}, 1)  # evaluation disabled: no row
    logger.log({"eval/digits/top1": 0.2}, 1)
    logger.close()
    assert MetricLogger(cfg, tmp_path, {}, rank=1).metrics_file is None  # other ranks write nothing

    first = json.loads((tmp_path / "run_info.json").read_text())
    resumed = MetricLogger(cfg, tmp_path, {"train": {"max_steps": 8}}, rank=0, world_size=2, resuming=True, resumed_from="latest")
    resumed.log({"train/loss": 1.0}, 2, samples_seen=48)
    resumed.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/samples_seen"]) for r in rows] == [(1, 16), (1, 16), (2, 48)]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["resumed_from"] == "latest" and info["config"]["train"]["max_steps"] == 8
    assert info["previous_launches"] == [{k: v for k, v in first.items() if k != "previous_launches"}]
    assert not os.path.exists(tmp_path / "wandb")
