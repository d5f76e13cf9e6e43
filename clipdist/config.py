"""Typed configuration: one dataclass per concern, registered as Hydra structured configs.

Every component receives its own section (``cfg.model``, ``cfg.data`` ...), never the whole
tree. ``validate`` runs before any process group exists, so a bad config fails fast with one
line naming the key.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import braceexpand


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass
class VisionConfig:
    arch: str = "vit"  # "vit" | "resnet" (OpenAI's ModifiedResNet)
    image_size: int = 224
    width: int = 768  # ViT: token width; ResNet: width of the stem (64 for RN50)
    layers: int = 12  # ViT depth (ignored for resnet)
    stage_blocks: List[int] = field(default_factory=lambda: [3, 4, 6, 3])  # resnet only
    patch_size: int = 32  # vit only
    head_width: int = 64  # attention heads = width // head_width (resnet: width*32 // head_width)
    mlp_ratio: float = 4.0


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12


ACTIVATIONS = ("quick_gelu", "gelu")  # model.act; clipdist.models.vit builds each


@dataclass
class ModelConfig:
    name: str = "ViT-B-32"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    grad_checkpointing: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    # SigLIP's learnable logit bias (its paper: -10, with init_logit_scale log 10); None for the
    # softmax CLIP loss, whose model has no bias.
    init_logit_bias: Optional[float] = None
    # The MLP activation of both towers: "quick_gelu" (x·sigmoid(1.702x), OpenAI's CLIP) or "gelu"
    # (exact GELU, open_clip's ViT-B-32 etc., most LAION / DataComp weights). Same parameters.
    act: str = "quick_gelu"
    # An OpenAI or OpenCLIP checkpoint file to start from (clipdist.models.load_pretrained); its
    # architecture must be this config's, and its activation model.act (a state dict does not
    # record it: see pretrained_arch).
    pretrained: Optional[str] = None
    # The open_clip model name of model.pretrained's weights, e.g. ViT-B-32 (GELU) or
    # ViT-B-32-quickgelu: states their activation where the file does not.
    pretrained_arch: Optional[str] = None
    # FLIP: the share of image patches dropped at random in training (0.5 in the paper); eval
    # always sees every patch. ViT only.
    patch_dropout: float = 0.0
    # LiT: freeze the image tower (no gradients, no optimizer state), except its last
    # lock_image_unlocked_blocks blocks (ViT resblocks / ResNet stages) and projection.
    lock_image: bool = False
    lock_image_unlocked_blocks: int = 0
    # torch.compile each tower (after gradient checkpointing is set up, before DeepSpeed).
    compile: bool = False


def model_fingerprint(cfg: ModelConfig) -> Dict[str, Any]:
    """The model keys that decide a checkpoint's tensors (their names, shapes, which have
    optimizer state) and what they compute, flattened ("model.vision.width": 768, ...): a
    checkpoint continues only under the same. Not in it: what may change between launches
    (gradient checkpointing, compile, FLIP, the name, where the first weights came from)."""
    kept = {
        "embed_dim": cfg.embed_dim,
        "act": cfg.act,
        "logit_bias": cfg.init_logit_bias is not None,
        "lock_image": cfg.lock_image,
        "lock_image_unlocked_blocks": cfg.lock_image_unlocked_blocks,
        **{f"vision.{key}": value for key, value in asdict(cfg.vision).items()},
        **{f"text.{key}": value for key, value in asdict(cfg.text).items()},
    }
    return {f"model.{key}": value for key, value in kept.items()}


@dataclass
class SourceConfig:
    """One shard collection of a training mix."""

    urls: str = ""  # brace pattern; several joined with '::'
    weight: float = 1.0  # share of the samples drawn in data.mode=resampled
    name: Optional[str] = None  # in logs (data/mix/<name>); default: source<i>
    # The shards' sample counts, when they are not beside the shards: a clipdist index or an
    # OpenCLIP sizes.json (path or URL). Default: looked up beside the shards (data/counts.py).
    index: Optional[str] = None
    # The source's total, shared equally by its shards when nothing else gives counts
    # (OpenCLIP's --train-num-samples habit). data.mode=resampled only.
    samples: Optional[int] = None


DATA_MODES = ("exact", "resampled")


@dataclass
class DataConfig:
    name: str = "digits"
    # One source, the common case. data.sources lists several (with weights) instead.
    train_urls: Optional[str] = "data/digits/train-{000000..000003}.tar"
    sources: List[SourceConfig] = field(default_factory=list)
    train_index: Optional[str] = None  # data.train_urls' index (see SourceConfig.index)
    train_samples: Optional[int] = None  # data.train_urls' total (see SourceConfig.samples)
    # exact: every sample once per epoch over all ranks and workers (the tail that cannot fill
    # a global batch is dropped, a different one each epoch). resampled: shards drawn with
    # replacement by source weight, samples_per_epoch samples per epoch.
    mode: str = "exact"
    samples_per_epoch: Optional[int] = None  # resampled only; default: the sources' total
    # Rows per forward on each rank, or "auto": the largest that fits launch.gpu_memory_gb for
    # train.global_batch on this launch's world size (clipdist.plan; train.accum_steps follows).
    local_batch: Any = 64
    num_workers: int = 0
    shuffle_buffer: int = 256
    # Attempts after a transient read failure (dropped connection, failing pipe), with backoff
    # 0.5, 1, 2 ... s, before the shard's unread samples are counted as missing or truncated.
    retries: int = 3
    # Write "step key key ..." lines per rank to <output_dir>/keys/ (audits, resume checks).
    record_keys: bool = False
    # Written on first use when the train shards are absent (the digits quickstart).
    generate_digits: bool = False


LOSS_IMPLS = ("gather", "ring", "siglip")


@dataclass
class LossConfig:
    # gather: all-gather with autograd, each rank scores its rows/columns against all B.
    # ring: same loss and gradients, embeddings travel a ring, [b, chunk_size] tiles only.
    # siglip: sigmoid loss (needs model.init_logit_bias), chunked over the same ring.
    impl: str = "gather"
    chunk_size: int = 4096  # columns per logits tile (ring, siglip)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 1000
    # Micro-batches per optimizer step (GradCache: the loss still spans all of them), or "auto":
    # train.global_batch / (data.local_batch × world size), whatever world size the launch has.
    accum_steps: Any = 1
    # Optional statement of the global batch; when set it must equal
    # data.local_batch × world_size × train.accum_steps (with accum_steps=auto: the batch kept).
    global_batch: Optional[int] = None
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # the newest N complete checkpoints stay, older ones go; 0: all stay
    # "auto": the newest complete checkpoint of this run if there is one, else a fresh start
    # (what a requeued Slurm job needs); "latest": that checkpoint, which must exist; or a
    # checkpoint directory.
    resume: Optional[str] = None
    # When the checkpoint's data position does not fit this run (another local or global batch,
    # seed, shuffle buffer or shards): continue from its weights and step at the start of the next
    # epoch, leaving the rest of the interrupted one untrained, instead of stopping.
    resume_inexact: bool = False
    # A rank that makes no progress for this long (dead, hung, or stuck in a collective with
    # one that is) stops every rank with a non-zero exit naming the culprit.
    fault_timeout_s: float = 600.0
    # Steps whose loss is NaN/inf are skipped (no update) and counted; this many in a row stop
    # the run with a checkpoint of the last good state.
    max_bad_steps: int = 5
    # On SIGUSR1/SIGTERM: checkpoint at the next step, then `scontrol requeue` when under Slurm.
    requeue: bool = True
    # Where the run goes. Default: Hydra's run directory, hydra.run.dir (runs/<logging.run_name>,
    # conf/config.yaml); a multirun point's default is its own Hydra job directory.
    output_dir: str = "${hydra:run.dir}"


@dataclass
class ZeroShotSetConfig:
    """A labelled eval set (KEY.cls per sample), classified with prompts from its class names."""

    name: str = ""  # metrics are eval/<name>/top1 ...
    urls: str = ""  # brace pattern; several joined with '::'
    # A list, or a file: .txt (one name per line) or .json (a list, or {"0": name} / {"0": [id, name]}
    # like ImageNet's class index). Any: OmegaConf has no list-or-string type.
    classnames: Any = None
    # A list of prompts with '{}' (or clip_benchmark's '{c}'), a .txt file of them (one per line),
    # or a built-in set: "imagenet80" (the CLIP paper's 80) or "short" (7). Unset: imagenet80, or
    # with root, root's zeroshot_classification_templates.txt.
    templates: Any = None
    # Instead of urls: a folder in clip_benchmark's WebDataset layout (test/nshards.txt,
    # test/0.tar.., classnames.txt, zeroshot_classification_templates.txt; clipdist/data/wds_layout.py),
    # which gives the shards, and the class names and templates unless set.
    root: str = ""


@dataclass
class RetrievalSetConfig:
    """A captioned eval set: KEY.txt holds an image's captions, one per line."""

    name: str = ""  # metrics are eval/<name>/image_to_text_R@1 ...
    urls: str = ""


@dataclass
class EvalConfig:
    zero_shot: List[ZeroShotSetConfig] = field(default_factory=list)
    retrieval: List[RetrievalSetConfig] = field(default_factory=list)
    every_steps: int = 0  # 0: only at the end
    local_batch: int = 128  # images (and prompts) per forward
    # Retrieval ranks queries against keys in [retrieval_chunk, retrieval_chunk] similarity tiles.
    retrieval_chunk: int = 4096


@dataclass
class LoggingConfig:
    project: str = "clipdist"
    run_name: str = "default"
    wandb_mode: str = "offline"  # "offline" | "online" | "disabled"
    # How long an online wandb run may take to start (reach the server, create the run) before
    # the run logs offline instead; no API key falls back at once.
    wandb_init_timeout_s: float = 30.0
    log_every: int = 10
    # Peak dense TFLOP/s of one device for MFU; default: looked up from the GPU's name (H100,
    # A100 ... in bf16), none on a CPU (then MFU is not logged).
    peak_tflops: Optional[float] = None


@dataclass
class LaunchConfig:
    """The cluster shape a recipe was written for; the run itself uses the real world size."""

    nodes: int = 1
    gpus_per_node: int = 1
    # The network interface(s) for the process group's traffic, e.g. "ib0" or "eth0,eth1": set
    # where a host's name resolves to an address that the other hosts cannot reach (a management
    # network first, a loopback entry for the host name). Default: GLOO_SOCKET_IFNAME /
    # NCCL_SOCKET_IFNAME from the environment, else the interface of the host name's address.
    socket_ifname: Optional[str] = None
    # Memory of one GPU in GiB (80 for an 80 GB H100 or A100): what clipdist.plan and
    # data.local_batch=auto plan for. On a CPU-only machine: the memory one rank may use.
    gpu_memory_gb: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=Config)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def expand_urls(pattern: str) -> List[str]:
    """Brace-expand a shard pattern; several patterns may be joined with '::'."""
    urls: List[str] = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part.strip()))
    return urls


def is_local(url: str) -> bool:
    """A file path, as opposed to a `pipe:` command or a URL with a scheme (s3://, https://)."""
    return not url.startswith("pipe:") and "://" not in url


def missing_local_shards(pattern: str) -> List[str]:
    return missing_files(u for u in expand_urls(pattern) if is_local(u))


def missing_files(paths) -> List[str]:
    # os.path.exists first: a glob per path costs seconds over 100,000 shards.
    return [p for p in paths if not os.path.exists(p) and not glob.glob(p)]


def validate(cfg: Config, world_size: int, *, check_data: bool = True, training: bool = True) -> None:
    """Check the values that no type system catches. Raises ConfigError naming the key.
    ``training=False`` (python -m clipdist.evaluate) leaves out the training data and batch.
    First settles data.local_batch=auto and train.accum_steps=auto for ``world_size``."""
    settle_batch(cfg, world_size, training=training)
    _require(cfg.model.vision.arch in ("vit", "resnet"), "model.vision.arch", f"expected 'vit' or 'resnet', got {cfg.model.vision.arch!r}")
    _require(cfg.model.vision.image_size > 0, "model.vision.image_size", "must be positive")
    if cfg.model.vision.arch == "vit":
        _require(
            cfg.model.vision.image_size % cfg.model.vision.patch_size == 0,
            "model.vision.patch_size",
            f"{cfg.model.vision.patch_size} does not divide image_size {cfg.model.vision.image_size}",
        )
    _require(cfg.model.text.context_length >= 2, "model.text.context_length", "must be at least 2 (SOT and EOT)")
    _require(cfg.model.act in ACTIVATIONS, "model.act", f"expected one of {list(ACTIVATIONS)}, got {cfg.model.act!r}")
    _require(not cfg.model.pretrained or Path(cfg.model.pretrained).is_file(), "model.pretrained", f"no such file: {cfg.model.pretrained}")
    _require(not cfg.model.pretrained_arch or bool(cfg.model.pretrained), "model.pretrained_arch", "names model.pretrained's open_clip model, but model.pretrained is not set")
    if cfg.model.pretrained:
        from clipdist.models.pretrained import activation_problem  # lazy: the models import this module

        problem = activation_problem(cfg.model.pretrained, cfg.model.pretrained_arch, cfg.model.act)
        _require(problem is None, "model.pretrained", f"{cfg.model.pretrained}: {problem}")
    _require(cfg.data.local_batch >= 1, "data.local_batch", f"must be >= 1, got {cfg.data.local_batch}")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.train.accum_steps >= 1, "train.accum_steps", f"must be >= 1, got {cfg.train.accum_steps}")
    _require(cfg.train.max_steps >= 1, "train.max_steps", "must be >= 1")
    _require(cfg.train.fault_timeout_s > 0, "train.fault_timeout_s", f"must be > 0, got {cfg.train.fault_timeout_s}")
    _require(cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0, got {cfg.train.keep_checkpoints}")
    _require(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {cfg.train.max_bad_steps}")
    _require(0.0 <= cfg.model.patch_dropout < 1.0, "model.patch_dropout", f"must be in [0, 1), got {cfg.model.patch_dropout}")
    _require(
        cfg.model.patch_dropout == 0.0 or cfg.model.vision.arch == "vit",
        "model.patch_dropout",
        "drops ViT patches; model.vision.arch is resnet",
    )
    _require(cfg.model.lock_image_unlocked_blocks >= 0, "model.lock_image_unlocked_blocks", "must be >= 0")
    _require(
        not training or not cfg.model.lock_image or bool(cfg.model.pretrained or cfg.train.resume),
        "model.lock_image",
        "locks the image tower's starting weights: set model.pretrained (LiT tunes text to a pretrained image tower) or train.resume",
    )
    _require(cfg.logging.peak_tflops is None or cfg.logging.peak_tflops > 0, "logging.peak_tflops", "must be > 0")
    _require(cfg.logging.wandb_init_timeout_s > 0, "logging.wandb_init_timeout_s", f"must be > 0, got {cfg.logging.wandb_init_timeout_s}")
    if cfg.launch.socket_ifname is not None:
        absent = [name for name in cfg.launch.socket_ifname.split(",") if not Path("/sys/class/net", name).exists()]
        _require(not absent, "launch.socket_ifname", f"no network interface {absent[0] if absent else ''!r} on this host")
    _require(cfg.loss.impl in LOSS_IMPLS, "loss.impl", f"expected one of {list(LOSS_IMPLS)}, got {cfg.loss.impl!r}")
    _require(cfg.loss.chunk_size >= 1, "loss.chunk_size", f"must be >= 1, got {cfg.loss.chunk_size}")
    _require(
        (cfg.loss.impl == "siglip") == (cfg.model.init_logit_bias is not None),
        "model.init_logit_bias",
        "must be set (e.g. -10) exactly when loss.impl=siglip; use loss=siglip, which sets both",
    )
    _require(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"expected 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    _require(cfg.deepspeed.precision in ("fp32", "bf16", "fp16"), "deepspeed.precision", f"expected fp32, bf16 or fp16, got {cfg.deepspeed.precision!r}")
    _require(cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode", f"expected offline, online or disabled, got {cfg.logging.wandb_mode!r}")
    derived = global_batch(cfg, world_size)
    if training and cfg.train.global_batch is not None:
        _require(
            cfg.train.global_batch == derived,
            "train.global_batch",
            f"{cfg.train.global_batch} != data.local_batch ({cfg.data.local_batch}) × world_size ({world_size}) "
            f"× train.accum_steps ({cfg.train.accum_steps}) = {derived}",
        )
    if training:
        validate_optim(cfg.optim)
        validate_data(cfg.data, check_files=check_data and not cfg.data.generate_digits)
    # The digits eval shards, like the train shards, are written on first use.
    validate_eval(cfg.eval, check_files=check_data and not cfg.data.generate_digits)


def validate_optim(cfg: OptimConfig) -> None:
    # Here, not left to PyTorch: AdamW's errors name no key, and it checks neither a parameter
    # group's weight decay nor the schedule (a negative one of either would train without a word).
    _require(0 < cfg.lr < math.inf, "optim.lr", f"must be > 0, got {cfg.lr}")
    _require(0 <= cfg.weight_decay < math.inf, "optim.weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    for key, beta in (("optim.beta1", cfg.beta1), ("optim.beta2", cfg.beta2)):
        _require(0 <= beta < 1, key, f"must be in [0, 1), got {beta}")
    _require(0 < cfg.eps < math.inf, "optim.eps", f"must be > 0, got {cfg.eps}")
    _require(cfg.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    _require(0 <= cfg.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1] (the share of optim.lr the cosine ends at), got {cfg.min_lr_ratio}")


def validate_eval(cfg: EvalConfig, *, check_files: bool) -> None:
    from clipdist.eval.sets import check_zero_shot_set  # holds the template sets

    _require(cfg.every_steps >= 0, "eval.every_steps", "must be >= 0")
    _require(cfg.local_batch >= 1, "eval.local_batch", f"must be >= 1, got {cfg.local_batch}")
    _require(cfg.retrieval_chunk >= 1, "eval.retrieval_chunk", f"must be >= 1, got {cfg.retrieval_chunk}")
    for kind, sets in (("zero_shot", cfg.zero_shot), ("retrieval", cfg.retrieval)):
        names = [s.name for s in sets]
        _require(len(set(names)) == len(names), f"eval.{kind}", f"set names must differ, got {names}")
        for i, eval_set in enumerate(sets):
            key = f"eval.{kind}[{i}]"
            valid_name = bool(eval_set.name) and not any(c in eval_set.name for c in "/ ")  # it becomes a metric path
            _require(valid_name, f"{key}.name", f"must be a non-empty name without '/' or spaces, got {eval_set.name!r}")
            if getattr(eval_set, "root", ""):
                continue  # a zero-shot set in clip_benchmark's layout: its root gives the shards (below)
            _require(bool(eval_set.urls), f"{key}.urls", "is empty")
            if check_files:
                missing = missing_local_shards(eval_set.urls)
                _require(not missing, f"{key}.urls", f"{len(missing)} shard(s) match no file, first: {missing[0] if missing else ''}")
    for i, eval_set in enumerate(cfg.zero_shot):
        check_zero_shot_set(eval_set, f"eval.zero_shot[{i}]", read_files=check_files)


def train_sources(cfg: DataConfig) -> List[SourceConfig]:
    """data.sources, or data.train_urls as a single source; each with its display name."""
    sources = cfg.sources or ([SourceConfig(cfg.train_urls, index=cfg.train_index, samples=cfg.train_samples)] if cfg.train_urls else [])
    return [SourceConfig(s.urls, s.weight, s.name or f"source{i}", s.index, s.samples) for i, s in enumerate(sources)]


def source_key(cfg: DataConfig, index: int, field: str = "") -> str:
    """The config key of a source's field, for error messages (data.train_urls, data.train_index,
    data.sources[1].urls ...); ``field=""`` names the source itself."""
    if not cfg.sources:
        return f"data.train_{field or 'urls'}"
    return f"data.sources[{index}]" + (f".{field}" if field else "")


def validate_data(cfg: DataConfig, *, check_files: bool) -> None:
    _require(
        not (cfg.sources and cfg.train_urls),
        "data.sources",
        "both data.sources and data.train_urls are set; use one (data.train_urls=null with data.sources)",
    )
    sources = train_sources(cfg)
    _require(bool(sources), "data.train_urls", "no training data: set data.train_urls (or CLIPDIST_TRAIN_URLS) or data.sources")
    _require(cfg.mode in DATA_MODES, "data.mode", f"expected one of {list(DATA_MODES)}, got {cfg.mode!r}")
    _require(cfg.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    names = [s.name for s in sources]
    _require(len(set(names)) == len(names), "data.sources", f"source names must differ, got {names}")
    _require(cfg.retries >= 0, "data.retries", f"must be >= 0, got {cfg.retries}")
    _require(
        not cfg.sources or (cfg.train_index is None and cfg.train_samples is None),
        "data.train_index" if cfg.train_index is not None else "data.train_samples",
        "belongs to data.train_urls; with data.sources, set data.sources[i].index / .samples",
    )
    for i, source in enumerate(sources):
        key = source_key(cfg, i)
        _require(bool(source.urls), source_key(cfg, i, "urls"), "is empty")
        _require(source.weight > 0, f"{key}.weight", f"must be > 0, got {source.weight}")
        if cfg.mode == "exact" and len(sources) > 1:
            _require(
                source.weight == 1.0,
                f"{key}.weight",
                "weights apply to data.mode=resampled; exact mode reads every sample once, so its mix is the sources' sizes",
            )
        if source.samples is not None:
            samples_key = source_key(cfg, i, "samples")
            _require(source.samples >= 1, samples_key, f"must be >= 1, got {source.samples}")
            _require(
                cfg.mode == "resampled",
                samples_key,
                "a total shared equally by the shards applies to data.mode=resampled only: exact mode reads every sample "
                "once, so it needs each shard's own count (write an index: python -m clipdist.data.index '<shards>')",
            )
        if check_files:
            # A few missing shards are skipped and counted by the loader; none at all is a mistake.
            urls = [u for u in expand_urls(source.urls) if is_local(u)]
            missing = missing_files(urls)
            _require(not urls or len(missing) < len(urls), key, f"no shard matches a file ({len(missing)} missing, first: {missing[0] if missing else ''})")
            if source.index and is_local(source.index):
                _require(Path(source.index).is_file(), source_key(cfg, i, "index"), f"no such file: {source.index}")
    if cfg.samples_per_epoch is not None:
        _require(cfg.mode == "resampled", "data.samples_per_epoch", "applies to data.mode=resampled only")
        _require(cfg.samples_per_epoch >= 1, "data.samples_per_epoch", "must be >= 1")


AUTO = "auto"


def settle_batch(cfg: Config, world_size: int, *, training: bool = True) -> None:
    """data.local_batch=auto is planned (settle_by_plan); train.accum_steps=auto becomes
    train.global_batch / (data.local_batch × world_size): the global batch stays when a run
    continues on another number of ranks or nodes."""
    accum = cfg.train.accum_steps
    if cfg.data.local_batch == AUTO:
        settle_by_plan(cfg, world_size, training=training)
        return
    _require(is_integer(cfg.data.local_batch), "data.local_batch", f"expected an integer or 'auto', got {cfg.data.local_batch!r}")
    if accum != AUTO:
        _require(is_integer(accum), "train.accum_steps", f"expected an integer or 'auto', got {accum!r}")
        return
    if not training and cfg.train.global_batch is None:
        cfg.train.accum_steps = 1  # evaluation: no step to accumulate
        return
    target = cfg.train.global_batch
    _require(target is not None, "train.accum_steps", "auto keeps train.global_batch: set it too (e.g. train.global_batch=4096)")
    per_micro_step = cfg.data.local_batch * world_size
    _require(
        target % per_micro_step == 0,
        "train.global_batch",
        f"{target} is not reachable on {world_size} rank(s) with data.local_batch={cfg.data.local_batch} "
        f"(train.accum_steps=auto needs a multiple of {per_micro_step}); choose a data.local_batch that divides {target} / {world_size}"
        if target % world_size == 0
        else f"{target} is not reachable on {world_size} rank(s) with data.local_batch={cfg.data.local_batch}: {world_size} does not divide it",
    )
    cfg.train.accum_steps = target // per_micro_step


def settle_by_plan(cfg: Config, world_size: int, *, training: bool) -> None:
    """data.local_batch=auto: the planner's largest micro-batch that fits launch.gpu_memory_gb
    and reaches train.global_batch (with train.accum_steps micro-batches when that is a number),
    keeping the configured loss and checkpointing."""
    if not training:
        cfg.data.local_batch = cfg.eval.local_batch  # evaluation: no training batch
        cfg.train.accum_steps = 1 if cfg.train.accum_steps == AUTO else cfg.train.accum_steps
        return
    _require(cfg.train.global_batch is not None, "data.local_batch", "auto reaches train.global_batch: set it too (e.g. train.global_batch=65536)")
    _require(cfg.launch.gpu_memory_gb is not None, "data.local_batch", "auto plans for launch.gpu_memory_gb: set it (GiB per GPU, e.g. 80)")
    accum = cfg.train.accum_steps
    _require(accum == AUTO or is_integer(accum), "train.accum_steps", f"expected an integer or 'auto', got {accum!r}")
    from clipdist.plan import DoesNotFit, plan_batch

    try:
        plan = plan_batch(cfg, world_size, accum_steps=None if accum == AUTO else accum)
    except DoesNotFit as error:
        raise ConfigError(f"data.local_batch: auto: {error}") from None
    cfg.data.local_batch, cfg.train.accum_steps = plan.shape.micro_batch, plan.shape.accum_steps


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.data.local_batch * world_size * cfg.train.accum_steps



def packaged_conf_dir() -> Path:
    """The config tree: clipdist/conf in an installed wheel (the build carries the repo's conf/
    there, see pyproject.toml), else the conf/ beside the package in a source checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "conf"


CONF_DIR = packaged_conf_dir()


def load_config(
    overrides: Sequence[str] = (), config_dir: Path = CONF_DIR, *, extra_config_dir: Optional[str] = None, config_name: str = "config"
) -> Tuple[Config, Dict[str, Any]]:
    """Compose conf/ with Hydra overrides into a typed Config (and its resolved plain dict).

    ``extra_config_dir`` is Hydra's ``--config-dir``: a user's own config tree, searched beside
    conf/ (``+experiment=mine`` finds its experiment/mine.yaml). ``hydra.*`` overrides compose as
    in any Hydra app: ``hydra.run.dir`` is the default of train.output_dir, ``hydra.searchpath``
    adds config folders. Unknown keys and wrong types become a ConfigError that names the key."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    register_configs()
    GlobalHydra.instance().clear()
    try:
        initialize_hydra(config_dir, extra_config_dir)
        dict_cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(dict_cfg)  # resolves ${hydra:run.dir} as under @hydra.main
        with open_dict(dict_cfg):
            del dict_cfg["hydra"]
        cfg = OmegaConf.to_object(dict_cfg)
        resolved = OmegaConf.to_container(dict_cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as error:  # Hydra/OmegaConf raise many types; all are config errors here
        raise ConfigError(describe_config_error(error)) from error
    finally:
        GlobalHydra.instance().clear()
    return cfg, resolved


def initialize_hydra(config_dir: Path, extra_config_dir: Optional[str]) -> None:
    """Hydra's search path as its @hydra.main builds it: the primary config tree, then the
    ``--config-dir`` tree ahead of the structured configs (hydra/_internal/utils.py, _run_hydra)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    search_path = create_config_search_path(search_path_dir=str(Path(config_dir).resolve()))
    if extra_config_dir is not None:
        extra = Path(extra_config_dir).resolve()
        if not extra.is_dir():
            raise ConfigError(f"--config-dir: no such directory: {extra_config_dir}")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="clipdist", config_search_path=search_path)


def describe_config_error(error: BaseException) -> str:
    """One line from Hydra's nested, multi-line composition errors, naming the key when known."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for err in chain:
        full_key = getattr(err, "full_key", None)
        if full_key:
            message = str(getattr(err, "msg", err)).strip().splitlines()[0]
            return f"{full_key}: {message}"
    messages = [str(err).strip() for err in chain if str(err).strip() not in ("", "None")]
    lines = [line.strip() for line in messages[0].splitlines() if line.strip()] if messages else [type(chain[0]).__name__]
    if any(type(err).__name__ == "OverrideParseException" for err in chain):
        # Brace patterns collide with Hydra's override grammar unless quoted.
        lines = [lines[0], "(quote values with braces or spaces: data.train_urls='shards/{00000..00099}.tar')"]
    return " ".join(lines)
