"""Exact contrastive gradient accumulation (GradCache: Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup").

Plain accumulation would score each micro-batch against its own negatives only: k micro-batches
of b rows would each see b × world negatives instead of k × b × world. GradCache keeps the loss
over the whole accumulated batch while holding the activations of only one micro-batch:

1. embed every micro-batch without a graph (the activations are freed at once);
2. score the loss over this rank's k·b rows, with the embeddings as leaves (the loss gathers over
   ranks, so the negatives span the global batch k·b·world), and backprop it to the leaves: the
   cached gradients dL/d(embeddings), dL/d(temperature)[, dL/d(bias)];
3. re-embed each micro-batch with a graph and backprop <outputs, cached gradients>, whose
   gradient with respect to the parameters is that micro-batch's exact share of dL/dθ (the loss
   depends on θ only through the embeddings, the temperature and the bias).

The shares add up in the gradient buffers over DeepSpeed's micro-steps, so the optimizer sees
dL/dθ of one step with a k× larger local batch. The price is one extra forward per micro-batch.

Random draws in the towers (FLIP's patch dropout) are replayed: the second forward of a
micro-batch restores the RNG state of its first, so it keeps the same patches.

One thing differs from a k× batch by design: BatchNorm (ResNet towers) normalises each
micro-batch with its own statistics, as it normalises each rank's batch with its own under data
parallelism.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, List, Sequence, Tuple, TypeVar

import torch
from torch import nn

from clipdist.faults import agree_loss_is_finite
from clipdist.losses.ring import compute_dtype
from clipdist.models.resnet import running_stats_frozen

log = logging.getLogger(__name__)

MicroBatch = TypeVar("MicroBatch")


def accumulation_groups(
    batches: Iterable[Tuple[int, int, MicroBatch]], accum_steps: int
) -> Iterator[Tuple[int, int, List[MicroBatch]]]:
    """(epoch, index in epoch, micro-batch) -> (epoch, index of the group's last micro-batch,
    `accum_steps` consecutive micro-batches), one group per optimizer step.

    A group never spans two epochs: an epoch of n loader batches gives n // accum_steps steps and
    its last n % accum_steps batches are dropped (every rank has the same n, so all drop alike).
    Resuming at index + 1 of a group's last batch therefore continues on a group boundary."""
    group: List[MicroBatch] = []
    group_epoch = None
    for epoch, index, batch in batches:
        if group and epoch != group_epoch:
            log.info(
                "epoch %d: dropped its last %d micro-batch(es), too few for train.accum_steps=%d", group_epoch, len(group), accum_steps
            )
            group = []
        group.append(batch)
        group_epoch = epoch
        if len(group) == accum_steps:
            yield epoch, index, group
            group = []


def train_step(
    engine, loss_fn: nn.Module, micro_batches: Sequence[Any], device: torch.device, dtype: torch.dtype, progress: Callable[[str], None] = lambda what: None
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """One optimizer step over `micro_batches` (objects with `.images` and `.tokens`).
    Returns this rank's loss over all its rows and the model outputs, both detached.
    ``progress(what)`` is told of each part of an accumulated step (the fault watchdog: a step
    of a very large batch may take longer than train.fault_timeout_s)."""
    loss, outputs = accumulate_gradients(engine, loss_fn, micro_batches, device, dtype, progress)
    engine.step()
    return loss, outputs


def accumulate_gradients(
    engine, loss_fn: nn.Module, micro_batches: Sequence[Any], device: torch.device, dtype: torch.dtype, progress: Callable[[str], None] = lambda what: None
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Everything of one optimizer step but the update, which the caller's single
    `engine.step()` then makes (as after `engine.backward(loss)`). Raises NonFiniteLoss on every
    rank, before any backward, when the loss is NaN/inf on any.

    One micro-batch is the plain step. With k > 1 (the engine's gradient_accumulation_steps),
    the gradients equal those of one step on the k micro-batches concatenated; the returned
    loss is that of the concatenated batch, and the outputs are concatenated in the same order."""
    expected = engine.gradient_accumulation_steps()
    if len(micro_batches) != expected:
        raise ValueError(f"train.accum_steps: the engine accumulates {expected} micro-batches per step, got {len(micro_batches)}")
    if len(micro_batches) == 1:
        outputs = engine(*_inputs(micro_batches[0], device, dtype))
        loss = loss_fn(*outputs)  # scores in float32 at least, whatever the tower dtype
        agree_loss_is_finite(loss)
        engine.backward(loss)
        return loss.detach(), tuple(output.detach() for output in outputs)
    leaves, row_counts, rng_states = _embed_without_graph(engine, micro_batches, device, dtype)
    progress(f"the loss over {len(micro_batches)} cached micro-batches")
    loss = loss_fn(*leaves)
    agree_loss_is_finite(loss)  # before any micro-step: a skipped step leaves DeepSpeed untouched
    loss.backward()  # collective like the loss itself: every rank caches its gradients together
    for index, micro_batch in enumerate(micro_batches):
        progress(f"micro-batch {index + 1}/{len(micro_batches)}")
        rows = slice(sum(row_counts[:index]), sum(row_counts[: index + 1]))
        with replayed_rng(rng_states[index], device):
            _backward_micro_batch(engine, micro_batch, leaves, rows, first=index == 0, device=device, dtype=dtype)
        if index < len(micro_batches) - 1:
            engine.step()  # DeepSpeed counts the micro-step; it updates only at the boundary
    return loss.detach(), tuple(leaf.detach() for leaf in leaves)


def _inputs(micro_batch: Any, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return micro_batch.images.to(device, dtype, non_blocking=True), micro_batch.tokens.to(device, non_blocking=True)


def _embed_without_graph(
    engine, micro_batches: Sequence[Any], device: torch.device, dtype: torch.dtype
) -> Tuple[List[torch.Tensor], List[int], List[tuple]]:
    """Leaves holding this rank's concatenated embeddings and the temperature (and bias), the
    micro-batches' row counts, and the RNG state before each one's forward.

    They are in the loss's scoring dtype (float32 for bf16/fp16 towers): dL/d(embedding) must not
    underflow in fp16, since only the second backward is loss-scaled. BatchNorm running statistics
    move here, once per micro-batch, as in plain training; the second forward leaves them alone."""
    per_micro_batch, rng_states = [], []
    with torch.no_grad():
        for micro_batch in micro_batches:
            rng_states.append(rng_state(device))
            per_micro_batch.append(engine(*_inputs(micro_batch, device, dtype)))
    images = torch.cat([outputs[0] for outputs in per_micro_batch])
    texts = torch.cat([outputs[1] for outputs in per_micro_batch])
    scalars = per_micro_batch[0][2:]  # temperature[, bias]: the same in every micro-batch
    # Copies, so that no leaf aliases a parameter: the model returns the bias parameter itself.
    leaves = [t.detach().to(compute_dtype(t.dtype), copy=True).requires_grad_() for t in (images, texts, *scalars)]
    return leaves, [len(outputs[0]) for outputs in per_micro_batch], rng_states


def rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed_rng(state: tuple, device: torch.device):
    """Draw the random numbers of ``state`` again; the RNG outside the block is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _backward_micro_batch(
    engine, micro_batch: Any, leaves: List[torch.Tensor], rows: slice, *, first: bool, device: torch.device, dtype: torch.dtype
) -> None:
    """Re-embed one micro-batch with a graph and backprop the cached gradients of its rows.

    The temperature (and bias) gradient is backpropagated with the first micro-batch only and
    zero with the others, so that every parameter takes part in every backward, as ZeRO expects."""
    with running_stats_frozen(engine.module):
        outputs = engine(*_inputs(micro_batch, device, dtype))
    cached = [leaves[0].grad[rows], leaves[1].grad[rows]]
    cached += [leaf.grad if first else torch.zeros_like(leaf.grad) for leaf in leaves[2:]]
    surrogate = sum((output.to(grad.dtype) * grad).sum() for output, grad in zip(outputs, cached))
    # The cached gradients are already those of the whole accumulated batch: no 1/k scaling.
    engine.backward(surrogate, scale_wrt_gas=False)
