"""Peak memory of one training rank, by component, from the config alone.

Every figure is bytes on one rank (one GPU, or one CPU process). The budget is the largest of
the step's phases (budget() says which) and evaluation's:

* one micro-batch (no accumulation): the states, the inputs, both towers' saved activations and
  the loss's buffers, or the backward's working set where that is larger;
* with accumulation (GradCache), the loss on the cached embeddings: the states, the inputs, the
  embeddings of every micro-batch and the loss's buffers over the global batch; then each
  micro-batch's backward: the states, the inputs, both caches, the gradients of the earlier
  micro-batches, its saved activations and the working set;
* evaluation: the states and an eval batch's forward, without a graph.

The transformer activations are counted per element from what autograd saves (checked against
``torch.autograd.graph.saved_tensors_hooks`` in tests/test_plan.py); the ResNet tower is counted
by running it on the meta device, which allocates nothing. DeepSpeed's states follow its
optimizers in 0.19 (ZeRO-0: torch AdamW on the model's parameters; bf16/fp16 ZeRO-0: DeepSpeed's
BF16_Optimizer / FP16_Optimizer, fp32 master weights; ZeRO-1/2: a flat fp32 partition with its
gradient; ZeRO-3: parameters partitioned too). Fitted constants are named and say what fitted
them (benchmarks/plan_vs_measured.py, benchmarks/results/loss_memory.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict

from clipdist.config import Config, ModelConfig

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
TOKEN_BYTES = 8  # int64 token ids

# DeepSpeed's defaults, which clipdist's engine config keeps (zero_optimization.*).
REDUCE_BUCKET_ELEMENTS = 500_000_000
ALLGATHER_BUCKET_ELEMENTS = 500_000_000
STAGE3_MAX_LIVE_ELEMENTS = 1_000_000_000

# On a CPU, what building a DeepSpeed engine adds to a process beyond its tensors (torch's and
# oneDNN's scratch, gloo's buffers, DeepSpeed's bookkeeping): 155-160 MiB for models of 4M to
# 151M parameters (benchmarks/plan_vs_measured.py, "after_engine_bytes" less the parameters).
CPU_RUNTIME_BYTES = 158 * 2**20

# On a GPU, memory no tensor accounts for: the CUDA context and kernels (~0.5 GiB), NCCL's
# buffers and the caching allocator's fragmentation. An assumption, to be replaced by the GPU
# check's measurement (benchmarks/gpu_check.sh).
CUDA_RESERVE_BYTES = 3 * GIB

# The backward of a transformer block holds, besides what the block saved, the gradients in
# flight through it: of its output, its MLP hidden layer and its attention's q, k, v. Elements
# per token, in units of the width w (hidden = mlp_ratio · w): fitted to the CPU measurements.
BLOCK_BACKWARD_WIDTHS = 6.0


@dataclass(frozen=True)
class Shape:
    """What the budget depends on besides the model: one rank's share of a step."""

    world_size: int
    micro_batch: int  # data.local_batch: rows per forward
    accum_steps: int  # micro-batches per optimizer step
    loss_impl: str  # gather | ring | siglip
    chunk_size: int  # loss.chunk_size (ring, siglip)
    grad_checkpointing: bool
    zero_stage: int
    precision: str  # fp32 | bf16 | fp16
    device: str = "cuda"  # "cuda": device memory (one micro-batch of inputs); "cpu": the process's RSS
    # GradCache's caches in host memory between the loss and the micro-batch backwards (the
    # loss itself needs the embeddings on the device). A planning option: not implemented in
    # training yet.
    offload_caches: bool = False

    @property
    def rank_rows(self) -> int:
        return self.micro_batch * self.accum_steps

    @property
    def global_batch(self) -> int:
        return self.rank_rows * self.world_size


@dataclass
class Budget:
    """Bytes per rank by component (in print order), the peak, and which phase sets it."""

    components: Dict[str, int]
    peaks: Dict[str, int]  # phase -> bytes
    notes: Dict[str, str] = field(default_factory=dict)  # component -> how it was counted

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(self.peaks, key=self.peaks.get)

    @property
    def train_peak(self) -> int:
        return self.peaks[self.train_peak_phase]

    @property
    def train_peak_phase(self) -> str:
        return max((phase for phase in self.peaks if phase != "evaluation"), key=self.peaks.get)


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    largest: int  # the largest single parameter tensor (ZeRO-3 gathers at least this)


_MEASURED: Dict[str, object] = {}  # meta-device counts, by the model config they are of


def counted_once(kind: str, cfg: ModelConfig, count, *args):
    """``count(cfg, *args)``, computed once per model config (configs are mutable, so the key is
    their repr)."""
    key = f"{kind}{args}{cfg!r}"
    if key not in _MEASURED:
        _MEASURED[key] = count(dataclasses.replace(cfg, compile=False, pretrained=None), *args)
    return _MEASURED[key]


def count_params(cfg: ModelConfig) -> ParamCounts:
    import torch

    from clipdist.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    params = list(model.parameters())
    return ParamCounts(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        largest=max(p.numel() for p in params),
    )


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Counted on the meta device: the model's own modules, no memory allocated."""
    return counted_once("params", cfg, count_params)


# ---------------------------------------------------------------------------------------------
# Model states (ZeRO)


def model_states(params: ParamCounts, shape: Shape) -> Dict[str, int]:
    """Per rank: what lives through the whole run (parameters, optimizer states: master weights
    and AdamW's two moments, persistent gradient partitions and buckets) and what each step
    adds while gradients are produced and reduced ("gradients in flight"), and ZeRO-3's
    parameters gathered for the forward and backward. Measured on the CPU: ZeRO-0 frees .grad
    after every step (DeepSpeed zeroes to None), so its gradients exist only in the backward."""
    n, stage = shape.world_size, shape.zero_stage
    half = shape.precision != "fp32"
    p_bytes = DTYPE_BYTES[shape.precision]
    total, trainable = params.total, params.trainable
    bucket = min(trainable, REDUCE_BUCKET_ELEMENTS) * p_bytes
    gathered = 0
    if stage == 0:
        # fp32: torch AdamW on the model's own parameters and .grad, flattened by buckets for the
        # all-reduce. bf16/fp16: DeepSpeed's BF16/FP16_Optimizer adds an fp32 copy of the
        # gradients and fp32 master weights, its states partitioned over the ranks.
        parameters = total * p_bytes
        master = trainable * FP32 // n if half else 0
        moments = 2 * trainable * FP32 // (n if half else 1)
        persistent_grads = trainable * FP32 if half else 0
        in_flight = trainable * p_bytes + min(trainable, ALLGATHER_BUCKET_ELEMENTS) * p_bytes
    elif stage in (1, 2):
        # The parameters flattened in their dtype (the model's become views), an fp32 partition
        # of them with its fp32 gradient, AdamW's moments of it; ZeRO-1 reduces whole gradients
        # at the step, ZeRO-2 bucket by bucket in the backward.
        parameters = total * p_bytes
        master, moments = trainable * FP32 // n, 2 * trainable * FP32 // n
        persistent_grads = trainable * FP32 // n + bucket
        in_flight = trainable * p_bytes if stage == 1 else bucket
    else:
        # Parameters partitioned too; a layer's are gathered to compute it (DeepSpeed keeps up
        # to stage3_max_live_parameters, 1e9, gathered: whole models of up to 1e9 parameters).
        parameters = total * p_bytes // n
        master, moments = trainable * FP32 // n, 2 * trainable * FP32 // n
        persistent_grads = trainable * FP32 // n + bucket
        in_flight = min(trainable, REDUCE_BUCKET_ELEMENTS) * p_bytes
        gathered = min(total, STAGE3_MAX_LIVE_ELEMENTS) * p_bytes
    if shape.device == "cpu":
        # An allocated bucket takes no memory until written; on a CPU the measure is what was.
        persistent_grads = min(persistent_grads, trainable * FP32 // n + trainable * p_bytes)
    return {
        "parameters": parameters,
        "optimizer states": master + moments,
        "gradients (kept)": persistent_grads,
        "gradients (in flight)": in_flight,
        "gathered parameters (ZeRO-3)": gathered,
    }


# ---------------------------------------------------------------------------------------------
# Activations


def block_saved_elements(tokens: int, width: int, mlp_ratio: float, act: str) -> float:
    """Elements one pre-LN transformer block saves for backward, per sample, its input included
    (which is the previous block's output): per token, LayerNorm inputs and outputs (4w), the
    packed q k v (3w), the attention output (w; flash-style SDPA, on CPU and GPU, saves no [n, n]
    matrix, and its [b, n, h, d] layout makes the out-projection's input a view of it), and the
    MLP's hidden pre-activation and activation output (2·hidden), plus QuickGELU's sigmoid."""
    hidden = mlp_ratio * width
    mlp = (3 if act == "quick_gelu" else 2) * hidden
    return tokens * (8 * width + mlp)


def block_backward_elements(tokens: int, width: int, mlp_ratio: float) -> float:
    return tokens * width * (BLOCK_BACKWARD_WIDTHS + 2 * mlp_ratio)


@dataclass(frozen=True)
class TowerActivations:
    """Bytes per sample: what stays saved through the forward, and what the backward of the
    costliest block adds at its peak (with checkpointing: that block recomputed, too)."""

    saved: float
    working: float


def transformer_tower(tokens: int, width: int, layers: int, mlp_ratio: float, act: str, stem: float, checkpointing: bool, dtype_bytes: int) -> TowerActivations:
    block = block_saved_elements(tokens, width, mlp_ratio, act)
    working = block_backward_elements(tokens, width, mlp_ratio)
    if checkpointing:
        # Block inputs only; backward recomputes one block at a time.
        return TowerActivations(saved=(stem + layers * tokens * width) * dtype_bytes, working=(block + working) * dtype_bytes)
    return TowerActivations(saved=(stem + layers * block) * dtype_bytes, working=working * dtype_bytes)


def kept_image_tokens(cfg: ModelConfig) -> int:
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    if cfg.patch_dropout > 0:
        patches = max(1, int(patches * (1.0 - cfg.patch_dropout)))
    return 1 + patches


def image_activations(cfg: ModelConfig, shape: Shape) -> TowerActivations:
    dtype_bytes = DTYPE_BYTES[shape.precision]
    if cfg.lock_image and cfg.lock_image_unlocked_blocks == 0:
        return TowerActivations(0.0, 0.0)  # a locked tower records no graph
    if cfg.vision.arch == "resnet":
        return resnet_activations(cfg, shape.grad_checkpointing, dtype_bytes)
    v = cfg.vision
    tokens = kept_image_tokens(cfg)
    # The image (conv input), ln_pre's input, and the last block's output (ln_post saves the
    # class token, a view that keeps all of it).
    stem = 3 * v.image_size**2 + 2 * tokens * v.width
    return transformer_tower(tokens, v.width, v.layers, v.mlp_ratio, cfg.act, stem, shape.grad_checkpointing, dtype_bytes)


def text_activations(cfg: ModelConfig, shape: Shape) -> TowerActivations:
    t = cfg.text
    # ln_final's input; token ids are counted with the inputs.
    stem = t.context_length * t.width
    return transformer_tower(t.context_length, t.width, t.layers, 4.0, cfg.act, stem, shape.grad_checkpointing, DTYPE_BYTES[shape.precision])


def trace_resnet(cfg: ModelConfig, checkpointing: bool) -> TowerActivations:
    """Bytes (fp32) per sample that the ResNet tower saves, counted by running it at batch 2 on
    the meta device with a saved-tensor hook; the working set: the largest bottleneck block's."""
    import torch

    from clipdist.models.resnet import ModifiedResNet

    with torch.device("meta"):
        tower = ModifiedResNet(cfg.vision, cfg.embed_dim)
    tower.train()
    tower.set_grad_checkpointing(checkpointing)
    images = torch.empty(2, 3, cfg.vision.image_size, cfg.vision.image_size, device="meta", requires_grad=True)
    saved = saved_bytes(lambda: tower(images), exclude=list(tower.parameters())) / 2
    blocks = [block for stage in tower.trunk_blocks() for block in stage]  # what checkpointing recomputes one by one
    block_inputs = []
    hooks = [block.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0])) for block in blocks]
    tower.set_grad_checkpointing(False)
    with torch.no_grad():
        tower(images)
    for hook in hooks:
        hook.remove()
    per_block = [saved_bytes(lambda: block(x.detach().requires_grad_()), exclude=list(block.parameters())) / 2 for block, x in zip(blocks, block_inputs)]
    return TowerActivations(saved=saved, working=max(per_block))


def resnet_activations(cfg: ModelConfig, checkpointing: bool, dtype_bytes: int) -> TowerActivations:
    traced = counted_once("resnet", cfg, trace_resnet, checkpointing)
    scale = dtype_bytes / FP32
    return TowerActivations(saved=traced.saved * scale, working=traced.working * scale)


def saved_bytes(forward, exclude=()) -> float:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs (parameters in
    ``exclude`` left out). Works on the meta device, where nothing is allocated."""
    import torch

    excluded = {p.untyped_storage()._cdata for p in exclude}
    sizes: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            sizes[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return float(sum(sizes.values()))


def activations(cfg: ModelConfig, shape: Shape) -> Dict[str, int]:
    """One micro-batch: both towers' saved activations (held together: the loss needs both
    embeddings before either backward), and the larger tower's backward working set."""
    image, text = image_activations(cfg, shape), text_activations(cfg, shape)
    b = shape.micro_batch
    return {"saved": int(b * (image.saved + text.saved)), "working": int(b * max(image.working, text.working))}


# ---------------------------------------------------------------------------------------------
# Inputs, GradCache, loss, evaluation


def inputs(cfg: ModelConfig, shape: Shape) -> int:
    """Images and token ids. On a GPU one micro-batch is on the device at a time (converted to
    the training dtype); on a CPU the step's micro-batches are all in the process (fp32)."""
    rows = shape.micro_batch if shape.device == "cuda" else shape.rank_rows
    image_bytes = FP32 if shape.device == "cpu" else DTYPE_BYTES[shape.precision]
    return rows * (3 * cfg.vision.image_size**2 * image_bytes + cfg.text.context_length * TOKEN_BYTES)


def grad_cache(cfg: ModelConfig, shape: Shape) -> Dict[str, int]:
    """With accumulation (engine/grad_cache.py): every micro-batch's embeddings, in fp32, kept
    from the graph-free first pass, and the loss's gradient for each, kept for the second."""
    if shape.accum_steps == 1:
        return {"embeddings": 0, "gradients": 0}
    both = 2 * shape.rank_rows * cfg.embed_dim * FP32
    return {"embeddings": both, "gradients": both}


def loss_buffers(cfg: ModelConfig, shape: Shape) -> int:
    """The loss's peak over the global batch B, with b = this rank's rows (all micro-batches),
    d = embed_dim, c = the tile width, in fp32 (the loss scores in fp32 at least):

    * gather: the [b, B] logits of both directions, their softmax and their gradients
      (4·b·B), and the gathered [B, d] embeddings with the gradient of one (3·B·d);
    * ring / siglip: the backward's three [b, c] tiles (similarity, row and column softmax:
      3·b·c) and [b, d] blocks and gradients (3·b·d), plus per-column partials over all B
      columns (5·B).

    Fitted on benchmarks/results/loss_memory.json (d = 512, c = 256, b = 4k to 64k per rank):
    gather within 1 % at 8k-32k, ring within 4 % at 8k and 0.1 % at 128k."""
    b, d, big_b = shape.rank_rows, cfg.embed_dim, shape.global_batch
    if shape.loss_impl == "gather":
        return (4 * b * big_b + 3 * big_b * d) * FP32
    c = min(shape.chunk_size, b)
    return (3 * b * d + 3 * b * c + 5 * big_b) * FP32


def evaluation(cfg: ModelConfig, eval_batch: int, precision: str) -> int:
    """An eval forward (no graph): the largest block's live tensors for eval.local_batch images,
    and the embeddings gathered to score them ([eval batch, d] per tower)."""
    dtype_bytes = DTYPE_BYTES[precision]
    v = cfg.vision
    if v.arch == "vit":
        tokens, width, ratio = (v.image_size // v.patch_size) ** 2 + 1, v.width, v.mlp_ratio
    else:
        tokens, width, ratio = (v.image_size // 4) ** 2, v.width, 4.0  # the stem's output, the widest map
    live = tokens * width * (4 + ratio) + 3 * v.image_size**2
    text = cfg.text.context_length * cfg.text.width * 8
    return int(eval_batch * (max(live, text) * dtype_bytes + 2 * cfg.embed_dim * FP32))


# ---------------------------------------------------------------------------------------------
# The budget


def budget(cfg: Config, shape: Shape) -> Budget:
    """Every component for ``shape``, and the peaks of the step's phases and of evaluation.

    In the backward of a single batch, the gradients being produced take the place of the
    activations being freed, so the two do not add up (except what checkpointing keeps, the
    block inputs); with accumulation, the gradients of earlier micro-batches are there from the
    start of each later backward."""
    model = cfg.model
    states = model_states(param_counts(model), shape)
    acts = activations(model, shape)
    caches = grad_cache(model, shape)
    loss = loss_buffers(model, shape)
    batch = inputs(model, shape)
    runtime = CUDA_RESERVE_BYTES if shape.device == "cuda" else CPU_RUNTIME_BYTES
    evaluation_bytes = evaluation(model, cfg.eval.local_batch, shape.precision)
    components = {
        **states,
        "activations (saved)": acts["saved"],
        "activations (backward working set)": acts["working"],
        "inputs": batch,
        "gradcache embeddings": caches["embeddings"],
        "gradcache gradients": caches["gradients"],
        "loss buffers": loss,
        "evaluation": evaluation_bytes,
        "runtime" if shape.device == "cpu" else "cuda reserve": runtime,
    }
    persistent = states["parameters"] + states["optimizer states"] + states["gradients (kept)"] + runtime + batch
    cached = 0 if shape.offload_caches else caches["embeddings"] + caches["gradients"]
    checkpointed = acts["saved"] if shape.grad_checkpointing else 0
    if shape.accum_steps == 1:
        backward = states["gathered parameters (ZeRO-3)"] + max(acts["saved"] + acts["working"], checkpointed + states["gradients (in flight)"])
    else:
        # The gradients of the earlier micro-batches are held through the later ones' backwards.
        backward = states["gathered parameters (ZeRO-3)"] + states["gradients (in flight)"] + acts["saved"] + acts["working"]
    if shape.accum_steps == 1:
        # The loss runs with both towers' activations held.
        peaks = {"step": persistent + max(backward, states["gathered parameters (ZeRO-3)"] + acts["saved"] + loss)}
    else:
        peaks = {
            "loss on cached embeddings": persistent + caches["embeddings"] + loss,
            "micro-batch backward": persistent + cached + backward,
        }
    peaks["evaluation"] = states["parameters"] + states["optimizer states"] + states["gradients (kept)"] + runtime + evaluation_bytes
    return Budget(components=components, peaks=peaks)

