"""MetricLogger against a real offline wandb run: samples-seen axis, run info, and no secrets;
an online run that cannot reach wandb (no key, no server) trains on and logs offline."""

import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from clipdist.config import LoggingConfig, load_config
from clipdist.log import PACKAGE_ROOT, MetricLogger, git_state, redact, redact_config
from conftest import QUIET_EVAL, TRAIN_ENV, free_port, train_overrides

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


# ---------------------------------------------------------------------------------------------
# logging.wandb_mode=online where wandb cannot be reached


def host_without_wandb(tmp_path: Path, **variables: str) -> dict:
    """The environment of a compute node with no wandb credentials and no route to a wandb
    server: no WANDB_* variables from the caller, an absent netrc file, empty wandb config and
    cache directories, and WANDB_BASE_URL at a closed local port (connections are refused)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {
        **env, **TRAIN_ENV,
        "NETRC": str(tmp_path / "netrc"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "MASTER_PORT": str(free_port()),  # a single process without torchrun still opens a store
        **variables,
    }  # fmt: skip


def wandb_lines(output: str) -> list[str]:
    """Console lines from clipdist's wandb handling or from wandb itself ("wandb: ...")."""
    return [line for line in output.splitlines() if "wandb:" in line]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_online_run_without_api_key_or_server_trains_and_logs_offline(tmp_path, digits):
    """logging.wandb_mode=online on a host with no API key and no reachable server: the run
    trains its 2 steps and exits 0; its one warning line says why it logs offline; metrics.jsonl
    and the offline wandb run both hold the 2 steps; its last line is the `wandb sync` command."""
    run_dir = tmp_path / "run"
    overrides = train_overrides(run_dir, digits, *QUIET_EVAL, "train.max_steps=2", "logging.wandb_mode=online")
    command = [sys.executable, "-m", "clipdist.train", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=host_without_wandb(tmp_path), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]

    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    warning, sync = wandb_lines(result.stdout + result.stderr)  # exactly these two
    assert warning.endswith(
        "wandb: no online run (no API key: set WANDB_API_KEY or run `wandb login`); "
        f"logging offline instead, upload later with: wandb sync {offline_run}"
    ), warning
    assert result.stdout.splitlines()[-1] == sync and sync.endswith(f"wandb: offline run in {offline_run}; upload it with: wandb sync {offline_run}")

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["train/samples_seen"]) for row in rows if "train/loss" in row] == [(1, 16), (2, 32)]
    histories = [r.history for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]
    samples_seen = [json.loads(i.value_json) for h in histories for i in h.item if (i.key or "/".join(i.nested_key)) == "train/samples_seen"]
    assert samples_seen == [16, 32], "the offline wandb run holds both steps"


BOUNDED_ONLINE_START = """
import atexit, sys, time
from pathlib import Path
from clipdist.config import LoggingConfig
from clipdist.log import MetricLogger, setup_console_logging

# Registered first, so it runs after every exit hook wandb registers later.
atexit.register(lambda: print(f"finished in {time.monotonic() - started:.1f} s", flush=True))
setup_console_logging(rank=0)
started = time.monotonic()
logger = MetricLogger(LoggingConfig(wandb_mode="online", wandb_init_timeout_s=2), Path(sys.argv[1]), {}, rank=0)
print(f"started in {time.monotonic() - started:.1f} s", flush=True)
logger.log({"train/loss": 1.0}, 1, samples_seen=8)
logger.close()
"""


def test_online_start_with_api_key_but_silent_server_is_bounded_and_writes_no_key(tmp_path):
    """An API key, and a server that accepts connections but never answers (a hung server, or a
    firewall's black hole): wandb would wait its default 90 s; clipdist gives up after
    logging.wandb_init_timeout_s (2 s here), logs offline, and exits without waiting on the
    server either. The key is written nowhere: not in the run directory, not in a netrc file,
    not in wandb's own files."""
    run_dir = tmp_path / "run"
    with socket.socket() as silent_server:
        silent_server.bind(("127.0.0.1", 0))
        silent_server.listen(64)  # the kernel completes the connections; nobody reads them
        env = host_without_wandb(tmp_path, WANDB_API_KEY=WANDB_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{silent_server.getsockname()[1]}")
        command = [sys.executable, "-c", BOUNDED_ONLINE_START, str(run_dir)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    started = float(re.search(r"started in ([0-9.]+) s", result.stdout)[1])
    finished = float(re.search(r"finished in ([0-9.]+) s", result.stdout)[1])
    # 2 s for the online try, then a new wandb service for the offline run (about 1.5 s on an idle
    # machine, measured); 10 s leaves room for a loaded host and is far below wandb's own 90 s.
    assert 2 <= started <= finished <= 10, f"started offline after {started} s, finished after {finished} s"
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    warning, _ = wandb_lines(result.stdout + result.stderr)
    assert re.search(r"wandb: no online run \(CommError within logging\.wandb_init_timeout_s=2: .+\); logging offline instead", warning), warning
    assert warning.endswith(f"upload later with: wandb sync {offline_run}")
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]

    assert not (tmp_path / "netrc").exists()
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert WANDB_KEY.encode() not in path.read_bytes(), f"API key written to {path.relative_to(tmp_path)}"
