"""The CUDA-only checks: bf16 autocast and bf16 DeepSpeed engines, torch.compile towers, NCCL on one
rank. Each test skips without CUDA (the CPU suite cannot run them); benchmarks/gpu_check.sh runs
them, with the other tests named *cuda*, on one GPU.

Engines and process groups live in a spawned process (one NCCL rank, tcp:// on a free port): a
NCCL group, DeepSpeed's accelerator (picked once, at its import) and dynamo's caches would
otherwise stay behind in the pytest process for the tests after these."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import tempfile
import traceback
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipdist.config import DeepSpeedConfig, LossConfig, OptimConfig
from clipdist.losses import build_loss, clip_loss_reference
from clipdist.models import build_model
from conftest import free_port
from test_models import TINY_VIT, random_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)")

BATCH = 8
# bf16 towers (8-bit mantissa) against float32 towers on the same weights: the loss agrees to 2e-2
# relative, as on the CPU (tests/test_towers.py).
BF16_LOSS_RTOL = 2e-2
# float32 on both sides, inductor's fused kernels summing in another order than eager's: unit-norm
# embeddings agree to 1e-4, the loss to 1e-5 relative, each gradient to 1e-4 of its parameter's
# largest entry plus 1e-7 (as tests/test_towers.py on the CPU). TF32 is off for the comparison.
COMPILE_EMB_ATOL = 1e-4
COMPILE_LOSS_RTOL = 1e-5
COMPILE_GRAD_ATOL = 1e-4
# Ring and gather on the same float32 CUDA embeddings differ in summation order only.
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-6


def _rank_main(port: int, result_path: str, fn: Callable, args: tuple) -> None:
    # What torchrun would set; DeepSpeed reads these. cuda, whatever the caller's DS_ACCELERATOR
    # says: the tests run on the GPU or not at all.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cuda")
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            outcome = ("ok", fn(*args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        outcome = ("error", traceback.format_exc())
    with open(result_path + ".tmp", "wb") as f:
        pickle.dump(outcome, f)
    os.replace(result_path + ".tmp", result_path)


def on_one_nccl_rank(fn: Callable, *args: Any, timeout: float = 300.0) -> Any:
    """``fn(*args)`` in a spawned process holding a world-size-1 NCCL group on GPU 0; its return
    value (which must pickle: move tensors to the CPU). Raises with the rank's traceback."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.pkl")
        process = mp.get_context("spawn").Process(target=_rank_main, args=(port, result_path, fn, args))
        process.start()
        try:
            process.join(timeout)
            timed_out = process.is_alive()
        finally:
            # Also when pytest-timeout interrupts the join: no rank is left holding the GPU.
            if process.is_alive():
                process.kill()
                process.join()
        if timed_out:
            raise TimeoutError(f"the NCCL rank was still running after {timeout:.0f} s")
        if not os.path.exists(result_path):
            raise RuntimeError(f"the NCCL rank died with exit code {process.exitcode}")
        with open(result_path, "rb") as f:
            status, value = pickle.load(f)
    if status == "error":
        raise RuntimeError(f"the NCCL rank failed:\n{value}")
    return value


def tiny_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = TINY_VIT.vision.image_size
    return torch.randn(BATCH, 3, size, size, generator=generator), random_tokens(BATCH, TINY_VIT.text, generator)


# ---------------------------------------------------------------------------------------------
# bf16: autocast (benchmarks/gpu_throughput.py) and DeepSpeed's bf16 engine (training)


def test_bf16_autocast_step_matches_float32():
    """A forward in bf16 autocast, as gpu_throughput.py times it, scores the loss in float32, close
    to the float32 model's; the backward gives finite float32 gradients."""
    torch.manual_seed(0)
    model = build_model(TINY_VIT).cuda()
    images, tokens = (t.cuda() for t in tiny_inputs())
    loss_fn = build_loss(LossConfig())
    with torch.no_grad():
        reference = loss_fn(*model(images, tokens)).item()
    # The embeddings may come out in float32 (autocast runs norms in float32): look at a matmul.
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    dtypes = []
    linear.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(images, tokens)
    assert dtypes and set(dtypes) == {torch.bfloat16}, f"autocast ran the towers' matmuls in {dtypes}"
    loss = loss_fn(*outputs)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference, rel=BF16_LOSS_RTOL)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _engine_steps() -> dict:
    """One train_step of the same weights through a bf16 and a float32 DeepSpeed engine
    (clipdist.engine.build_engine: DeepSpeed's BF16_Optimizer on CUDA, fused AdamW beneath)."""
    from clipdist.engine import build_engine, train_step
    from clipdist.engine.deepspeed_engine import engine_device

    device = engine_device()  # cuda:0 here (DS_ACCELERATOR=cuda); the CPU would do to debug the test
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    twin = copy.deepcopy(model)
    images, tokens = tiny_inputs()
    batch = [SimpleNamespace(images=images, tokens=tokens)]
    results = {}
    for name, module, precision, dtype in (("fp32", twin, "fp32", torch.float32), ("bf16", model, "bf16", torch.bfloat16)):
        engine = build_engine(module, OptimConfig(warmup_steps=1), DeepSpeedConfig(precision=precision), local_batch=BATCH, accum_steps=1, world_size=1, total_steps=10)
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        loss, _ = train_step(engine, build_loss(LossConfig()), batch, device, dtype)
        after = list(engine.module.parameters())
        changed = sum(int((p.detach().float() != b).sum()) for p, b in zip(after, before))
        results[name] = {
            "loss": loss.item(),
            "loss_dtype": loss.dtype,
            "param_dtype": after[0].dtype,
            "param_device": after[0].device.type,
            "finite": all(bool(torch.isfinite(p).all()) for p in after),
            "moved": changed / sum(b.numel() for b in before),
        }
    return results


def test_bf16_engine_train_step_matches_float32():
    """clipdist's training step (build_engine + train_step) with deepspeed.precision=bf16 on the
    GPU: bf16 weights on CUDA, a float32 loss within 2e-2 of the float32 engine's, finite weights
    after the update, and the update moved the weights."""
    results = on_one_nccl_rank(_engine_steps)
    bf16, fp32 = results["bf16"], results["fp32"]
    assert (bf16["param_dtype"], bf16["param_device"], bf16["loss_dtype"]) == (torch.bfloat16, "cuda", torch.float32)
    assert bf16["finite"] and fp32["finite"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=BF16_LOSS_RTOL)
    # AdamW's first step moves every weight with a gradient by ~lr (unused token rows have none:
    # 97 % of float32 weights move here). Stored in bf16, a weight above ~0.1 keeps its value
    # for a step of 5e-4 (8-bit mantissa): 74 % moved on the CPU's bf16 engine.
    assert fp32["moved"] > 0.9 and bf16["moved"] > 0.5


# ---------------------------------------------------------------------------------------------
# torch.compile towers (inductor: Triton kernels on the GPU)


def _compiled_vs_eager() -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    cfg = TINY_VIT
    torch.manual_seed(0)
    eager = build_model(cfg).cuda()
    compiled = build_model(dataclasses.replace(cfg, compile=True)).cuda()
    compiled.load_state_dict(eager.state_dict())  # strict: compiling in place keeps the keys
    images, tokens = (t.cuda() for t in tiny_inputs())
    loss_fn = build_loss(LossConfig())
    out = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        image_emb, text_emb, scale = model(images, tokens)
        loss = loss_fn(image_emb, text_emb, scale)
        loss.backward()
        out[name] = {
            "image": image_emb.detach().cpu(),
            "text": text_emb.detach().cpu(),
            "loss": loss.item(),
            "grads": {n: p.grad.cpu() for n, p in model.named_parameters()},
        }
    out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return out


def test_compiled_towers_match_eager_on_cuda():
    """model.compile=true (inductor) against the eager model on the same weights and batch:
    embeddings, loss and gradients agree within float32 reordering (tolerances above)."""
    result = on_one_nccl_rank(_compiled_vs_eager)
    eager, compiled = result["eager"], result["compiled"]
    assert result["graphs"] >= 2, "both towers ran compiled"
    torch.testing.assert_close(compiled["image"], eager["image"], rtol=0, atol=COMPILE_EMB_ATOL)
    torch.testing.assert_close(compiled["text"], eager["text"], rtol=0, atol=COMPILE_EMB_ATOL)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=COMPILE_LOSS_RTOL)
    for name, expected in eager["grads"].items():
        actual = compiled["grads"][name]
        torch.testing.assert_close(actual, expected, rtol=0, atol=COMPILE_GRAD_ATOL * expected.abs().max().item() + 1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# NCCL on one rank


def _nccl_collectives_and_losses() -> dict:
    device = torch.device("cuda", 0)
    # The collectives training uses, on CUDA tensors through NCCL (at world size 1 clipdist's own
    # helpers skip them, so call torch.distributed directly).
    summed = torch.arange(4.0, device=device)
    dist.all_reduce(summed)
    gathered = torch.empty(4, device=device)
    dist.all_gather_into_tensor(gathered, torch.arange(4.0, device=device))
    dist.barrier()
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(64, 32, generator=generator), dim=-1) for _ in range(2))
    scale = torch.tensor([14.0])
    results = {"backend": dist.get_backend(), "summed": summed.cpu(), "gathered": gathered.cpu()}
    for impl in ("gather", "ring"):
        leaves = [t.to(device).requires_grad_() for t in (image, text, scale)]
        loss = build_loss(LossConfig(impl=impl, chunk_size=16))(*leaves)  # 4 tiles per block
        loss.backward()
        results[impl] = {"loss": loss.item(), "grads": [leaf.grad.cpu() for leaf in leaves]}
    results["reference"] = clip_loss_reference(image.double(), text.double(), scale.double()).item()
    return results


def test_nccl_one_rank_collectives_and_ring_loss_equal_gather():
    """A world-size-1 NCCL group (tcp://) runs all_reduce, all_gather and barrier on GPU tensors;
    under it the ring loss (tiles of 16 columns) gives the gather loss's value and gradients, and
    both the float64 reference loss."""
    result = on_one_nccl_rank(_nccl_collectives_and_losses)
    assert result["backend"] == "nccl"
    assert torch.equal(result["summed"], torch.arange(4.0)) and torch.equal(result["gathered"], torch.arange(4.0))
    gather, ring = result["gather"], result["ring"]
    assert ring["loss"] == pytest.approx(gather["loss"], rel=LOSS_RTOL)
    assert gather["loss"] == pytest.approx(result["reference"], rel=LOSS_RTOL)
    for expected, actual in zip(gather["grads"], ring["grads"]):
        torch.testing.assert_close(actual, expected, rtol=0, atol=GRAD_ATOL)
