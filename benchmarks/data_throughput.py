"""How many samples per second one data-loader worker prepares (decode, preprocess, tokenize),
beside how many a training step of the tiny and vitb32 configs consumes.

    python benchmarks/data_throughput.py              # about 2-3 minutes on 2 cores
    python benchmarks/data_throughput.py --only-http  # the local-vs-HTTP loader row alone, about 40 s

Inputs are real photographs: random crops of scikit-learn's two sample photos (china, flower),
saved as JPEG at quality 95 (img2dataset's default) with short sides typical of web-scale sets:
exactly 224 (img2dataset --image_size 224), 256 (its default), 384 and 512. Captions are English
sentences from Python's own documentation (pydoc_data). They are written as WebDataset shards.

One worker subprocess (one process, torch.set_num_threads(1), like a DataLoader worker)
measures, for the tiny config's image size (32) and for 224:

* samples/s of: decode only (full scale); the decode path before load_image ("before");
  the exact path (full decode + clip_preprocess, bitwise open_clip); load_image (reduced-scale
  JPEG decode); load_image + tokenize; clipdist's train loader with 0 and 1 workers;
* the CPU time of each stage of load_image + tokenize (decode, resize, normalise, tokenize),
  which names the bottleneck, and of two alternatives that clipdist does not use (bilinear
  resize, the old strided normalisation).

Rates are samples per CPU-second of the worker process (for the 1-worker loader, of its child):
a worker occupies one core, and CPU time is far less disturbed than wall time by other jobs on a
shared machine. Wall-clock rates are recorded beside them.

Local disk vs HTTP: the same shards read by clipdist's train loader (0 workers, so the worker
subprocess is the loader) from the temp folder and from a loopback HTTP server that serves that
folder (tests/http_server.py's ShardServer, a ThreadingHTTPServer on 127.0.0.1). The server runs
in a thread of the driver process, never in the measured worker, so its CPU time does not count
as the worker's. Local and HTTP alternate (local first in even rounds, HTTP first in odd ones),
each measurement reading whole epochs until ``--http-min-cpu-seconds`` of the worker's CPU time,
at both image sizes; the report gives medians over ``--http-rounds`` rounds and the ratio
http / local per worker, per CPU-second and per wall second (target: >= 0.9).
``--only-http`` runs just this comparison and updates the "http_vs_local" section of an
existing results file, keeping its other keys.

Step demand: one subprocess per config runs forward, the gathered CLIP loss (world size 1) and
backward on batches from the loader, with torch's default threads, and reports batch / step
time. Workers needed = demand / the loader's per-worker rate. A GPU figure (OpenCLIP's
published ViT-B/32 throughput on A100s) gives an estimate, not measured here, of the workers a
GPU needs.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence

import numpy as np
import PIL
import torch
from _common import describe_machine
from PIL import Image, features

from clipdist.config import DataConfig, load_config
from clipdist.data.pipeline import build_train_loader
from clipdist.data.shards import url_pattern
from clipdist.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop_box,
    clip_preprocess,
    decode_for_size,
    fit_to_square,
    load_image,
    resized_size,
    to_normalised_tensor,
)
from clipdist.data.urls import file_name
from clipdist.data.write_shards import write_samples
from clipdist.losses import build_loss
from clipdist.models import build_model, tokenize

SOURCE_SHORT_SIDES = (224, 256, 384, 512)
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 16 / 9)  # width / height
JPEG_QUALITY = 95
# Output image size -> caption context length: the tiny config's, and vitb32's.
CONTEXTS = {32: 16, 224: 77}
LOADER_BATCH = 16
STEP_CASES = {"tiny": {"batch": 16, "steps": 10}, "vitb32": {"batch": 8, "steps": 2}}
HTTP_TARGET = 0.9  # the bar: HTTP >= 0.9 x local samples/s per loader worker
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"

# Cherti et al., "Reproducible scaling laws for contrastive language-image learning" (CVPR 2023),
# trained_models_info.csv in github.com/LAION-AI/scaling-laws-openclip: OpenCLIP ViT-B/32 at
# 256 samples per GPU on 128 A100-40GB GPUs (JUWELS Booster) trained at 93,294 samples/s
# (LAION-2B, 13B samples seen) and 108,845 samples/s (LAION-400M and -80M runs): 729 and 850
# samples/s per GPU.
GPU_REFERENCE = {
    "model": "ViT-B/32",
    "gpu": "A100-40GB",
    "samples_per_second_per_gpu": [93294.3 / 128, 108844.6 / 128],
    "source": "LAION-AI/scaling-laws-openclip, trained_models_info.csv (Cherti et al., CVPR 2023): "
    "Model-B-32_Data-2B_Samples-13B_lr-5e-4_bs-32k and Model-B-32_Data-400M_Samples-34B_lr-5e-4_bs-32k, 128 GPUs",
}


# ---------------------------------------------------------------------------------------------
# Inputs


def sample_photos() -> List[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(pixels) for pixels in load_sample_images().images]


def random_crop(photo: Image.Image, short_side: int, rng: np.random.Generator) -> Image.Image:
    """A crop of random aspect and position, as large as the photo allows, scaled so that its
    short side is ``short_side`` (from the 427-px photos, 512 is a mild upscale)."""
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    width, height = (round(short_side * aspect), short_side) if aspect >= 1 else (short_side, round(short_side / aspect))
    if width / height > photo.width / photo.height:
        crop_width, crop_height = photo.width, round(photo.width * height / width)
    else:
        crop_width, crop_height = round(photo.height * width / height), photo.height
    left = int(rng.integers(0, photo.width - crop_width + 1))
    top = int(rng.integers(0, photo.height - crop_height + 1))
    image = photo.crop((left, top, left + crop_width, top + crop_height)).resize((width, height), Image.Resampling.LANCZOS)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.integers(2) else image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def documentation_sentences(min_words: int = 4, max_words: int = 20) -> List[str]:
    """Caption-length English sentences from the interpreter's own help texts."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    sentences = (" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in sentences if min_words <= len(s.split()) <= max_words and sum(c.isalpha() for c in s) > 0.7 * len(s)]


def write_inputs(out_dir: Path, per_size: int, seed: int) -> Dict[str, Any]:
    """Shards of the four source sizes interleaved (the loader's input), and the same samples
    grouped by source size in samples.json's order (the per-function measurements' input)."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    captions = documentation_sentences()
    samples = []
    for index in range(per_size * len(SOURCE_SHORT_SIDES)):
        short_side = SOURCE_SHORT_SIDES[index % len(SOURCE_SHORT_SIDES)]
        image = random_crop(photos[int(rng.integers(len(photos)))], short_side, rng)
        caption = captions[int(rng.integers(len(captions)))]
        samples.append({"__key__": f"{index:06d}", "jpg": jpeg_bytes(image), "txt": caption, "short_side": short_side})
    shard_size = 64
    write_samples(({k: v for k, v in s.items() if k != "short_side"} for s in samples), str(out_dir), "bench", shard_size)
    num_shards = -(-len(samples) // shard_size)
    return {
        "urls": url_pattern(str(out_dir), "bench", num_shards),
        "samples": samples,
        "mean_jpeg_bytes": {str(side): statistics.mean(len(s["jpg"]) for s in samples if s["short_side"] == side) for side in SOURCE_SHORT_SIDES},
        "mean_caption_words": statistics.mean(len(s["txt"].split()) for s in samples),
    }


# ---------------------------------------------------------------------------------------------
# Timing


def cpu_seconds(include_children: bool = False) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if include_children:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += children.ru_utime + children.ru_stime
    return total


def per_item_seconds(fn: Callable[[Any], Any], items: Sequence[Any], min_cpu_seconds: float) -> Dict[str, float]:
    """CPU and wall seconds per item, over whole passes through ``items`` (after one warm-up
    pass over a few of them) until at least ``min_cpu_seconds`` of CPU time is spent."""
    for item in items[:4]:
        fn(item)
    count, cpu_start, wall_start = 0, cpu_seconds(), time.perf_counter()
    while True:
        for item in items:
            fn(item)
        count += len(items)
        cpu = cpu_seconds() - cpu_start
        if cpu >= min_cpu_seconds:
            return {"cpu": cpu / count, "wall": (time.perf_counter() - wall_start) / count}


def rates(seconds: Dict[str, float]) -> Dict[str, float]:
    return {"samples_per_cpu_second": 1.0 / seconds["cpu"], "samples_per_wall_second": 1.0 / seconds["wall"]}


# ---------------------------------------------------------------------------------------------
# Decode paths (the per-sample functions the loader can run)

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def decode_before(data: bytes, image_size: int) -> torch.Tensor:
    """clipdist's decode path before load_image (as of commit 2380140), the baseline: JPEGs drafted
    only while both sides stay >= 2 × the target, geometry taken from the rounded-up reduced
    grid, normalisation on a strided channels-last tensor."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("RGB", (2 * image_size, 2 * image_size))
        image = image.convert("RGB")
        size = resized_size(image.width, image.height, image_size)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        if image.size != (image_size, image_size):
            image = image.crop(center_crop_box(image.width, image.height, image_size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float().div_(255.0) - _MEAN) / _STD


def decode_full(data: bytes, image_size: int) -> Image.Image:
    """Decode only, at full scale (what any path without drafting pays first)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image


def decode_exact(data: bytes, image_size: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return clip_preprocess(image, image_size)


def load_and_tokenize(sample: Dict[str, Any], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_image(sample["jpg"], image_size), tokenize(sample["txt"], CONTEXTS[image_size])


PATHS: Dict[str, Callable[[Dict[str, Any], int], Any]] = {
    "decode only": lambda s, size: decode_full(s["jpg"], size),
    "before": lambda s, size: decode_before(s["jpg"], size),
    "exact (no draft)": lambda s, size: decode_exact(s["jpg"], size),
    "load_image": lambda s, size: load_image(s["jpg"], size),
    "load_image + tokenize": load_and_tokenize,
}


# ---------------------------------------------------------------------------------------------
# Per-stage profile of load_image + tokenize


def strided_normalise(image: Image.Image) -> torch.Tensor:
    """The normalisation before load_image: arithmetic on a permuted (strided) view."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (pixels.float().div_(255.0) - _MEAN) / _STD


def stage_profile(samples: Sequence[Dict[str, Any]], image_size: int, min_cpu_seconds: float) -> Dict[str, float]:
    """CPU milliseconds per sample of each stage of load_image + tokenize, and of alternatives."""
    data = [s["jpg"] for s in samples]
    decoded = [decode_for_size(d, image_size) for d in data]
    fitted = [fit_to_square(image, region, image_size) for image, region in decoded]
    # Bilinear is what a faster resize would be; it changes the result (open_clip is bicubic).
    bilinear_sizes = [resized_size(image.width, image.height, image_size) for image, _ in decoded]
    batches = [[s["txt"] for s in samples[i : i + LOADER_BATCH]] for i in range(0, len(samples), LOADER_BATCH)]
    seconds = {
        "decode": per_item_seconds(lambda d: decode_for_size(d, image_size), data, min_cpu_seconds),
        "resize": per_item_seconds(lambda pair: fit_to_square(pair[0], pair[1], image_size), decoded, min_cpu_seconds),
        "normalise": per_item_seconds(to_normalised_tensor, fitted, min_cpu_seconds),
        # A batch per call, as the loader does; the warm-up pass fills the tokenizer's word cache.
        "tokenize": per_item_seconds(lambda captions: tokenize(captions, CONTEXTS[image_size]), batches, min_cpu_seconds),
        "alt: resize bilinear (not used)": per_item_seconds(
            lambda i: decoded[i][0].resize(bilinear_sizes[i], Image.Resampling.BILINEAR), range(len(decoded)), min_cpu_seconds
        ),
        "alt: strided normalise (before)": per_item_seconds(strided_normalise, fitted, min_cpu_seconds),
    }
    seconds["tokenize"] = {clock: t * len(batches) / len(samples) for clock, t in seconds["tokenize"].items()}
    return {stage: 1e3 * s["cpu"] for stage, s in seconds.items()}


# ---------------------------------------------------------------------------------------------
# The train loader, end to end


def loader_rate(urls: str, image_size: int, num_workers: int) -> Dict[str, float]:
    """One epoch of clipdist's train loader (tar reading, decode, tokenize, batching) on one rank."""
    cfg = DataConfig(train_urls=urls, local_batch=LOADER_BATCH, num_workers=num_workers, shuffle_buffer=4 * LOADER_BATCH)
    loader = build_train_loader(cfg, image_size=image_size, context_length=CONTEXTS[image_size], rank=0, world_size=1, seed=0, epoch=0)
    cpu_start, wall_start = cpu_seconds(include_children=True), time.perf_counter()
    rows = sum(batch.images.shape[0] for batch in loader)
    # With a worker, the parent mostly waits; its child's CPU time joins RUSAGE_CHILDREN once
    # the DataLoader has shut it down at the end of the epoch.
    cpu, wall = cpu_seconds(include_children=True) - cpu_start, time.perf_counter() - wall_start
    return {"samples": rows, "samples_per_cpu_second": rows / cpu, "samples_per_wall_second": rows / wall}


def run_data_worker(inputs_path: Path, min_cpu_seconds: float) -> Dict[str, Any]:
    torch.set_num_threads(1)
    inputs = json.loads(inputs_path.read_text())
    samples = [{**s, "jpg": bytes.fromhex(s["jpg"])} for s in inputs["samples"]]
    by_side = {str(side): [s for s in samples if s["short_side"] == side] for side in SOURCE_SHORT_SIDES}
    tokenize("a photo")  # loads the vocabulary
    start = cpu_seconds()
    for s in samples:
        tokenize(s["txt"])
    tokenize_cold_ms = 1e3 * (cpu_seconds() - start) / len(samples)
    result: Dict[str, Any] = {"threads": torch.get_num_threads(), "tokenize_cold_cache_ms": tokenize_cold_ms, "sizes": {}}
    for image_size in CONTEXTS:
        paths = {
            name: {side: rates(per_item_seconds(lambda s: fn(s, image_size), group, min_cpu_seconds)) for side, group in by_side.items()}
            for name, fn in PATHS.items()
        }
        for by_source in paths.values():
            # Equal numbers of samples per source size: the mix costs the mean of the per-sample costs.
            by_source["mixed"] = {
                key: 1.0 / statistics.mean(1.0 / by_source[side][key] for side in by_side)
                for key in ("samples_per_cpu_second", "samples_per_wall_second")
            }
        stages = {side: stage_profile(group, image_size, min_cpu_seconds / 2) for side, group in by_side.items()}
        stages["mixed"] = {stage: statistics.mean(stages[side][stage] for side in by_side) for stage in stages[next(iter(by_side))]}
        loader = {f"num_workers={workers}": loader_rate(inputs["urls"], image_size, workers) for workers in (0, 1)}
        result["sizes"][str(image_size)] = {"paths": paths, "stages_ms": stages, "loader": loader}
    return result


# ---------------------------------------------------------------------------------------------
# The train loader from local disk and from a loopback HTTP server


def loader_epochs_rate(urls: str, image_size: int, min_cpu_seconds: float) -> Dict[str, float]:
    """Whole epochs of the 0-worker train loader (this process reads, decodes and batches) until
    ``min_cpu_seconds`` of CPU time; the plan (sample counts from the index) is made beforehand."""
    cfg = DataConfig(train_urls=urls, local_batch=LOADER_BATCH, num_workers=0, shuffle_buffer=4 * LOADER_BATCH)
    loader = build_train_loader(cfg, image_size=image_size, context_length=CONTEXTS[image_size], rank=0, world_size=1, seed=0, epoch=0)
    rows, epochs, cpu_start, wall_start = 0, 0, cpu_seconds(), time.perf_counter()
    while True:
        rows += sum(batch.images.shape[0] for batch in loader)
        epochs += 1
        cpu = cpu_seconds() - cpu_start
        if cpu >= min_cpu_seconds:
            wall = time.perf_counter() - wall_start
            return {"samples": rows, "epochs": epochs, "samples_per_cpu_second": rows / cpu, "samples_per_wall_second": rows / wall}


def run_http_worker(local_urls: str, http_urls: str, rounds: int, min_cpu_seconds: float) -> Dict[str, Any]:
    """Local and HTTP, alternating, ``rounds`` times at each image size, in this one process."""
    torch.set_num_threads(1)
    tokenize("a photo")  # loads the vocabulary
    urls = {"local": local_urls, "http": http_urls}
    for where in urls.values():  # warm-up: tokenizer cache, imports, the first connection
        loader_epochs_rate(where, 32, 0.0)
    sizes: Dict[str, Any] = {}
    for image_size in CONTEXTS:
        runs: Dict[str, List[Dict[str, float]]] = {"local": [], "http": []}
        for round_ in range(rounds):
            for where in ("local", "http") if round_ % 2 == 0 else ("http", "local"):
                runs[where].append(loader_epochs_rate(urls[where], image_size, min_cpu_seconds))
        sizes[str(image_size)] = runs
    return {"threads": torch.get_num_threads(), "sizes": sizes}


def summarize_http(worker: Dict[str, Any], rounds: int, min_cpu_seconds: float, tar_gets: int) -> Dict[str, Any]:
    keys = ("samples_per_cpu_second", "samples_per_wall_second")
    sizes = {}
    for size, runs in worker["sizes"].items():
        medians = {where: {key: statistics.median(r[key] for r in group) for key in keys} for where, group in runs.items()}
        sizes[size] = {
            **medians,
            "ratio_http_over_local": {key: medians["http"][key] / medians["local"][key] for key in keys},
            "ratio_per_round": {key: [h[key] / l[key] for h, l in zip(runs["http"], runs["local"])] for key in keys},
            "runs": runs,
        }
    return {
        "machine": describe_machine(),
        "what": "clipdist's train loader, num_workers=0, mixed sources, one worker process (1 thread): "
        "the same shards from the local disk and from a loopback HTTP server run in the driver process",
        "server": "tests/http_server.py ShardServer (http.server.ThreadingHTTPServer, HTTP/1.1, 127.0.0.1)",
        "rounds": rounds,
        "min_cpu_seconds_per_measurement": min_cpu_seconds,
        "threads": worker["threads"],
        "tar_gets": tar_gets,
        "target_ratio": HTTP_TARGET,
        "sizes": sizes,
    }


@contextmanager
def shard_server(folder: Path) -> Iterator[Any]:
    """tests/http_server.py's ShardServer over ``folder``, in a thread of this (driver) process."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from http_server import ShardServer

    with ShardServer(folder) as server:
        yield server


def measure_http(folder: Path, local_urls: str, rounds: int, min_cpu_seconds: float) -> Dict[str, Any]:
    with shard_server(folder) as server:
        http_urls = server.url(file_name(local_urls))
        worker = spawn(["--worker", "http", "--urls", local_urls, "--http-urls", http_urls, "--http-rounds", str(rounds),
                        "--http-min-cpu-seconds", str(min_cpu_seconds)])
        tar_gets = len(server.gets(".tar"))
    return summarize_http(worker, rounds, min_cpu_seconds, tar_gets)


def format_http(http: Dict[str, Any]) -> str:
    lines = [f"train loader, 0 workers, mixed sources: local disk vs loopback HTTP, one worker (medians of {http['rounds']} "
             f"alternating rounds, {http['tar_gets']} tar GETs in all):"]
    for size, entry in http["sizes"].items():
        ratio = entry["ratio_http_over_local"]
        per_round = ", ".join(f"{r:.2f}" for r in entry["ratio_per_round"]["samples_per_cpu_second"])
        lines.append(
            f"  {size:>3} px: per CPU-second local {entry['local']['samples_per_cpu_second']:.0f}, http "
            f"{entry['http']['samples_per_cpu_second']:.0f}, http/local {ratio['samples_per_cpu_second']:.2f} (rounds: {per_round}); "
            f"per wall second {entry['local']['samples_per_wall_second']:.0f} and {entry['http']['samples_per_wall_second']:.0f}, "
            f"{ratio['samples_per_wall_second']:.2f}"
        )
    worst = min(e["ratio_http_over_local"]["samples_per_cpu_second"] for e in http["sizes"].values())
    lines.append(f"  target http/local >= {http['target_ratio']}: {'met' if worst >= http['target_ratio'] else 'NOT met'} "
                 f"(lowest per-CPU-second ratio {worst:.2f})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Step demand


def run_step_worker(experiment: str, batch: int, steps: int, urls: str, threads: int | None) -> Dict[str, Any]:
    """Samples/s that training steps of ``experiment`` consume on this machine: forward, the
    configured loss over the gathered batch (world size 1: no process group), backward."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config([f"+experiment={experiment}"])[0]
    model = build_model(cfg.model).train()
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    loss_fn = build_loss(cfg.loss)
    data = DataConfig(train_urls=urls, local_batch=batch, num_workers=0, shuffle_buffer=batch)
    loader = build_train_loader(
        data, image_size=cfg.model.vision.image_size, context_length=cfg.model.text.context_length, rank=0, world_size=1, seed=0, epoch=0
    )
    first = next(iter(loader))

    def step() -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=False)
        loss_fn(*model(first.images, first.tokens)).backward()
        return time.perf_counter() - start

    step()  # warm-up: allocates gradients and library workspaces
    seconds = statistics.median(step() for _ in range(steps))
    return {
        "model": cfg.model.name,
        "image_size": cfg.model.vision.image_size,
        "context_length": cfg.model.text.context_length,
        "grad_checkpointing": cfg.model.grad_checkpointing,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "step_seconds": seconds,
        "samples_per_second": batch / seconds,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def spawn(args: List[str]) -> Dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bottleneck(stages: Dict[str, float]) -> Dict[str, Any]:
    used = {stage: ms for stage, ms in stages.items() if not stage.startswith("alt:")}
    total = sum(used.values())
    stage = max(used, key=used.get)
    return {"stage": stage, "share": used[stage] / total, "shares": {s: ms / total for s, ms in used.items()}}


def summarize(data: Dict[str, Any], steps: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Workers needed per config (demand / the 0-worker loader's rate at that image size) and the
    GPU estimate for ViT-B/32."""
    needed = {}
    for name, step in steps.items():
        per_worker = data["sizes"][str(step["image_size"])]["loader"]["num_workers=0"]["samples_per_cpu_second"]
        needed[name] = {"demand_samples_per_second": step["samples_per_second"], "per_worker_samples_per_second": per_worker,
                        "workers_needed": step["samples_per_second"] / per_worker}
    per_worker_224 = data["sizes"]["224"]["loader"]["num_workers=0"]["samples_per_cpu_second"]
    gpu = {**GPU_REFERENCE, "per_worker_samples_per_second": per_worker_224,
           "workers_per_gpu": [rate / per_worker_224 for rate in GPU_REFERENCE["samples_per_second_per_gpu"]]}
    return {"workers_needed": needed, "gpu_estimate_not_measured_here": gpu,
            "bottleneck": {size: bottleneck(entry["stages_ms"]["mixed"]) for size, entry in data["sizes"].items()}}


def format_report(result: Dict[str, Any]) -> str:
    sides = [str(s) for s in SOURCE_SHORT_SIDES] + ["mixed"]
    lines = [f"one worker (1 process, 1 thread), samples per CPU-second; JPEG q{JPEG_QUALITY} at source short side:"]
    for size, entry in result["data"]["sizes"].items():
        lines.append(f"\n{size} px output     " + "".join(f"{s:>8}" for s in sides))
        for name, by_source in entry["paths"].items():
            lines.append(f"  {name:<22}" + "".join(f"{by_source[s]['samples_per_cpu_second']:>8.0f}" for s in sides))
        loader = entry["loader"]
        zero, one = loader["num_workers=0"], loader["num_workers=1"]
        lines.append(f"  train loader, mixed: num_workers=0 {zero['samples_per_cpu_second']:.0f}, num_workers=1 "
                     f"{one['samples_per_cpu_second']:.0f} (worker start-up included) per CPU-second; "
                     f"{zero['samples_per_wall_second']:.0f} and {one['samples_per_wall_second']:.0f} per wall second")
        stages = entry["stages_ms"]["mixed"]
        lines.append("  stages, ms/sample (mixed): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        neck = result["summary"]["bottleneck"][size]
        lines.append(f"  bottleneck at {size} px: {neck['stage']} ({100 * neck['share']:.0f} % of load_image + tokenize)")
    lines.append("\nstep demand on this machine (forward + gathered loss + backward):")
    for name, need in result["summary"]["workers_needed"].items():
        step = result["steps"][name]
        lines.append(f"  {name:<7} {step['model']}, {step['image_size']} px, batch {step['batch']}, {step['threads']} threads: "
                     f"{need['demand_samples_per_second']:.1f} samples/s -> workers needed {need['workers_needed']:.3f} "
                     f"(at {need['per_worker_samples_per_second']:.0f} samples/s per worker)")
    gpu = result["summary"]["gpu_estimate_not_measured_here"]
    low, high = gpu["samples_per_second_per_gpu"]
    lines.append(f"\nESTIMATE, not measured here: OpenCLIP {gpu['model']} trains at {low:.0f}-{high:.0f} samples/s per {gpu['gpu']} "
                 f"({gpu['source']}); at {gpu['per_worker_samples_per_second']:.0f} samples/s per worker (this CPU, 224 px, mixed "
                 f"sources) that is {gpu['workers_per_gpu'][0]:.1f}-{gpu['workers_per_gpu'][1]:.1f} loader workers (cores) per GPU.")
    if "http_vs_local" in result:
        lines.append("\n" + format_http(result["http_vs_local"]))
    return "\n".join(lines)


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-size", type=int, default=48, help="samples per source short side (4 sizes)")
    parser.add_argument("--min-cpu-seconds", type=float, default=0.4, help="CPU time per measured path and source size")
    parser.add_argument("--step-threads", type=int, default=None, help="torch threads for the training steps (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http-rounds", type=int, default=7, help="alternating rounds of the local-vs-HTTP loader comparison")
    parser.add_argument("--http-min-cpu-seconds", type=float, default=1.0, help="worker CPU time per local or HTTP measurement")
    parser.add_argument("--only-http", action="store_true",
                        help="run only the local-vs-HTTP loader comparison; update that section of --out, keeping the rest")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_throughput.json"))
    parser.add_argument("--worker", choices=["data", "step", "http"], help=argparse.SUPPRESS)
    parser.add_argument("--http-urls", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "data":
        print(json.dumps(run_data_worker(args.inputs, args.min_cpu_seconds)))
        return
    if args.worker == "step":
        print(json.dumps(run_step_worker(args.experiment, args.batch, args.steps, args.urls, args.step_threads)))
        return
    if args.worker == "http":
        print(json.dumps(run_http_worker(args.urls, args.http_urls, args.http_rounds, args.http_min_cpu_seconds)))
        return
    if args.only_http:
        main_only_http(args)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipdist-throughput-") as tmp:
        inputs = write_inputs(Path(tmp), args.per_size, args.seed)
        inputs_path = Path(tmp) / "samples.json"
        inputs_path.write_text(json.dumps({"urls": inputs["urls"], "samples": [{**s, "jpg": s["jpg"].hex()} for s in inputs["samples"]]}))
        data = spawn(["--worker", "data", "--inputs", str(inputs_path), "--min-cpu-seconds", str(args.min_cpu_seconds)])
        threads = [] if args.step_threads is None else ["--step-threads", str(args.step_threads)]
        steps = {
            name: spawn(["--worker", "step", "--experiment", name, "--batch", str(case["batch"]), "--steps", str(case["steps"]),
                         "--urls", inputs["urls"], *threads])
            for name, case in STEP_CASES.items()
        }
        http = measure_http(Path(tmp), inputs["urls"], args.http_rounds, args.http_min_cpu_seconds)
    result = {
        "machine": {**describe_machine(), "pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo")},
        "inputs": {
            "source_short_sides": list(SOURCE_SHORT_SIDES),
            "samples_per_size": args.per_size,
            "jpeg_quality": JPEG_QUALITY,
            "mean_jpeg_bytes": inputs["mean_jpeg_bytes"],
            "mean_caption_words": inputs["mean_caption_words"],
            "loader_batch": LOADER_BATCH,
        },
        "data": data,
        "steps": steps,
    }
    result["summary"] = summarize(data, steps)
    result["http_vs_local"] = http
    result["seconds"] = time.perf_counter() - started
    print(format_report(result))
    print(f"\n({result['seconds']:.0f} s in all)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def main_only_http(args: argparse.Namespace) -> None:
    """The local-vs-HTTP comparison alone, on the same inputs as a full run; its section replaces
    "http_vs_local" in ``args.out`` (every other key stays as the last full run wrote it)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipdist-throughput-") as tmp:
        inputs = write_inputs(Path(tmp), args.per_size, args.seed)
        http = measure_http(Path(tmp), inputs["urls"], args.http_rounds, args.http_min_cpu_seconds)
    http["seconds"] = time.perf_counter() - started
    print(format_http(http))
    print(f"\n({http['seconds']:.0f} s in all)")
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["http_vs_local"] = http
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
