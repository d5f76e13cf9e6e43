#!/usr/bin/env bash
# One-command check of clipdist on one CUDA GPU, in under 8 minutes, into one JSON:
#
#   bash benchmarks/gpu_check.sh [OUT.json]      # default: benchmarks/results/gpu_check.json
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/gpu_check.json
#
# 1. the CUDA-only tests (tests/test_cuda.py: bf16 autocast and bf16 engines, torch.compile
#    towers, NCCL on one rank; and every other test named *cuda*, e.g. the fused AdamW one):
#    pass/fail per test, from pytest's JUnit XML;
# 2. benchmarks/gpu_throughput.py for ViT-B/32, B/16 and L/14: samples/s and MFU per case;
# 3. benchmarks/gpu_ring_memory.py: the ring loss's peak memory at global batch 32k..256k on
#    this one GPU against clipdist/plan/memory.py's prediction.
#
# Without CUDA it prints one line saying so, writes {"gpu": null, "skipped": ...} and exits 0:
# nothing here can run on a CPU, and a CPU-only CI must not fail on it.
#
# Every step runs under `timeout`, within a shared budget (GPU_CHECK_BUDGET_S, 450 s) that keeps
# the whole run under 8 minutes; a step that fails or runs out of time is recorded as such and
# the next one still runs. The JSON is written atomically (OUT.tmp, then mv). Exit status: 0
# when every step passed (or there is no GPU), 1 when one failed or timed out (the JSON says
# which), 2 on a usage error.
#
# Environment: PYTHON (default: python) the interpreter with clipdist and torch installed;
# GPU_CHECK_BUDGET_S the seconds all steps may take together.
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh [OUT.json]" >&2; exit 2; }
[[ $# -le 1 ]] || usage
[[ ${1:-} != -* ]] || usage

PYTHON=${PYTHON:-python}
# OUT is relative to where the caller stands; everything else to the repo root.
OUT=${1:-}
if [[ -n $OUT && $OUT != /* ]]; then OUT="$PWD/$OUT"; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu_check.json}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$((SECONDS + BUDGET_S))

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The machine, and whether CUDA is there, into $WORK/machine.json; prints 1 or 0.
probe() {
  "$PYTHON" - "$WORK/machine.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from _common import describe_machine

machine = {**describe_machine(), "cuda_runtime": torch.version.cuda}
gpu = None
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    gpu = {
        "name": torch.cuda.get_device_name(0),
        "memory_bytes": props.total_memory,
        "capability": f"{props.major}.{props.minor}",
        "count": torch.cuda.device_count(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
    }
json.dump({"machine": machine, "gpu": gpu}, open(sys.argv[1], "w"))
print(int(gpu is not None))
PY
}

# run_step NAME LIMIT_S COMMAND...: COMMAND under `timeout`, within what is left of the budget;
# its output goes to $WORK/NAME.log, and "status rc seconds limit" to $WORK/NAME.status.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  ((left > 0)) || left=0
  ((limit <= left)) || limit=$left
  if ((limit < 10)); then
    echo "skipped - 0 $limit" >"$WORK/$name.status"
    echo "gpu_check: $name: skipped, the ${BUDGET_S} s budget is spent"
    return
  fi
  echo "gpu_check: $name (at most $limit s) ..."
  local started=$SECONDS rc=0
  # --kill-after: a rank stuck in a NCCL call may ignore SIGTERM.
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  local status=ok
  if ((rc == 124 || rc == 137)); then status=timed_out; elif ((rc != 0)); then status=failed; fi
  echo "$status $rc $((SECONDS - started)) $limit" >"$WORK/$name.status"
  echo "gpu_check: $name: $status ($((SECONDS - started)) s)"
}

# Everything in $WORK into one JSON at $OUT.tmp (argument: the reason when there is no GPU).
assemble() {
  "$PYTHON" - "$WORK" "$OUT.tmp" "$BUDGET_S" "$SECONDS" "${1:-}" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, budget, seconds, skipped = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
LOG_TAIL = 3000  # characters of a failed step's output kept in the JSON


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step(name):
    status_file = work / f"{name}.status"
    if not status_file.exists():
        return {"status": "not_run"}
    status, rc, took, limit = status_file.read_text().split()
    result = {"status": status, "exit_code": None if rc == "-" else int(rc), "seconds": int(took), "limit_seconds": int(limit)}
    log = work / f"{name}.log"
    if status != "ok" and log.exists():
        result["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:]
    return result


def tests():
    """pytest's JUnit XML: counts, and each test's outcome (with the message of a failure)."""
    path = work / "tests.xml"
    if not path.exists():
        return None
    cases = []
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], found.get("message")
                break
        entry = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time", 0))}
        if message:
            entry["message"] = message[:500]
        cases.append(entry)
    counts = {outcome: sum(c["outcome"] == outcome for c in cases) for outcome in ("passed", "failed", "error", "skipped")}
    return {**counts, "cases": cases}


def throughput(model):
    """Per case: samples/s, TFLOP/s and MFU (None where the GPU's peak is not in clipdist.perf)."""
    result = read_json(work / f"throughput_{model}.json")
    if result is None:
        return None
    keys = ("grad_checkpointing", "patch_dropout", "batch", "status", "reason", "samples_per_second", "tflops", "mfu", "hfu", "peak_memory_bytes")
    return {
        "peak_tflops": result["machine"].get("peak_tflops"),
        "precision": result["precision"],
        "steps": result["steps"],
        "cases": [{key: case[key] for key in keys if key in case} for case in result["cases"]],
    }


probe = read_json(work / "machine.json") or {}
report = {"gpu": probe.get("gpu"), "machine": probe.get("machine"), "budget_seconds": budget}
if skipped:
    report["skipped"] = skipped
else:
    models = ("vitb32", "vitb16", "vitl14")
    steps = {"tests": step("tests"), **{f"throughput_{m}": step(f"throughput_{m}") for m in models}, "ring_memory": step("ring_memory")}
    report.update(
        steps=steps,
        tests=tests(),
        throughput={m: throughput(m) for m in models},
        ring_memory=read_json(work / "ring_memory.json"),
        ok=all(s["status"] == "ok" for s in steps.values()),
    )
report["total_seconds"] = seconds
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2) + "\n")
PY
  mv -f "$OUT.tmp" "$OUT"
}

if ! available=$(probe 2>"$WORK/probe.log"); then
  cat "$WORK/probe.log" >&2
  echo "gpu_check: $PYTHON could not import torch and clipdist (set PYTHON to the project's interpreter)" >&2
  exit 1
fi
if [[ $available != 1 ]]; then
  reason="no CUDA GPU here (torch.cuda.is_available() is False); nothing to check"
  echo "gpu_check: $reason"
  assemble "$reason"
  exit 0
fi

# DeepSpeed picks its accelerator at import: the GPU, whatever the caller's shell says.
export DS_ACCELERATOR=cuda
gpu=$("$PYTHON" -c 'import json, sys; g = json.load(open(sys.argv[1]))["gpu"]; print("%s, %.0f GiB" % (g["name"], g["memory_bytes"] / 2**30))' "$WORK/machine.json")
echo "gpu_check: $gpu; the steps get ${BUDGET_S} s in all"

# 1. The tests that skip without CUDA: tests/test_cuda.py, and any test with "cuda" in its name
#    (-k matches module names too). Collecting the whole suite to select them takes ~5 s.
#    A test stuck past 150 s fails alone (pytest-timeout), so the others still report.
run_step tests 200 "$PYTHON" -m pytest tests -k cuda -p no:cacheprovider -q -rA --timeout=150 --junitxml="$WORK/tests.xml"

# 2. Throughput and MFU, one process per model so that a slow or stuck one keeps the others'
#    results. One batch per model, each 4 cases (checkpointing x patch dropout) of 7 steps. L/14
#    at 128: its saved bf16 activations are ~280 MB a sample without checkpointing (the
#    planner's count), so 256 would not fit 80 GB; B/32 and B/16 at 256 need under 30 GB.
for spec in vitb32:256:45 vitb16:256:60 vitl14:128:100; do
  IFS=: read -r model batch limit <<<"$spec"
  run_step "throughput_$model" "$limit" "$PYTHON" benchmarks/gpu_throughput.py --models "$model" --batches "$batch" \
    --steps 5 --warmup 2 --out "$WORK/throughput_$model.json"
done

# 3. Ring loss memory at 32k..256k on this GPU against the plan (writes after every batch size).
run_step ring_memory 90 "$PYTHON" benchmarks/gpu_ring_memory.py --out "$WORK/ring_memory.json"

assemble
echo "gpu_check: wrote $OUT"
not_ok=()
for status in "$WORK"/*.status; do
  read -r outcome _ <"$status"
  [[ $outcome == ok ]] || not_ok+=("$(basename "$status" .status): $outcome")
done
if ((${#not_ok[@]})); then
  echo "gpu_check: not ok: $(printf '%s; ' "${not_ok[@]}")see $OUT" >&2
  exit 1
fi
