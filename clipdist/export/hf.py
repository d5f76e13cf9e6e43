"""clipdist ViT CLIP -> Hugging Face ``transformers``: a ``CLIPModel`` directory (config.json,
model.safetensors) with its ``CLIPProcessor`` (tokenizer and image-processor files), loadable
offline with ``CLIPModel.from_pretrained(dir)`` / ``CLIPProcessor.from_pretrained(dir)``.

The two models are the same function: HF's ``CLIPModel`` is OpenAI's architecture with q/k/v
split into separate linear layers and the projections stored as ``nn.Linear`` (transposed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from clipdist.config import ModelConfig
from clipdist.data.transforms import CLIP_MEAN, CLIP_STD
from clipdist.export.run import ExportError
from clipdist.models.clip import state_dict_mismatch
from clipdist.models.tokenizer import VOCAB_SIZE, SimpleTokenizer

# Our LayerNorms are torch's default; HF's CLIP config must say so explicitly.
LAYER_NORM_EPS = 1e-5
PIL_BICUBIC = 3  # the resample code of PIL.Image.Resampling.BICUBIC, as HF image-processor configs store it


def check_hf_exportable(cfg: ModelConfig) -> None:
    """Refuse, in one line, what HF's CLIPModel cannot represent."""
    if cfg.vision.arch != "vit":
        raise ExportError("HF CLIPModel has no ModifiedResNet vision tower; use --to open_clip")
    if cfg.init_logit_bias is not None:
        raise ExportError("HF CLIPModel has no logit bias (this is a SigLIP-loss model); use --to open_clip")
    if cfg.text.vocab_size != VOCAB_SIZE:
        raise ExportError(f"model.text.vocab_size is {cfg.text.vocab_size}, but the CLIP tokenizer exported with the model has {VOCAB_SIZE} tokens")


def hf_config(cfg: ModelConfig, logit_scale: float) -> Dict[str, Any]:
    """Keyword arguments of ``transformers.CLIPConfig`` for this architecture."""
    tokenizer = SimpleTokenizer()
    text = cfg.text
    vision = cfg.vision
    return {
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale,
        "text_config": {
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": 4 * text.width,  # the text tower's MLP ratio is fixed at 4 (clipdist.models.text)
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": cfg.act,  # model.act's names are transformers' ACT2FN names: gelu is exact
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": cfg.embed_dim,
            # HF pools the text at the first eos_token_id; the tokenizer pads with EOT as well.
            "bos_token_id": tokenizer.sot_token_id,
            "eos_token_id": tokenizer.eot_token_id,
            "pad_token_id": tokenizer.eot_token_id,
        },
        "vision_config": {
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.width // vision.head_width,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_act": cfg.act,  # model.act's names are transformers' ACT2FN names: gelu is exact
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": cfg.embed_dim,
        },
    }


def _layer_norm(state_dict: Mapping[str, torch.Tensor], ours: str, theirs: str) -> Dict[str, torch.Tensor]:
    return {f"{theirs}.weight": state_dict[f"{ours}.weight"], f"{theirs}.bias": state_dict[f"{ours}.bias"]}


def _encoder(state_dict: Mapping[str, torch.Tensor], ours: str, theirs: str) -> Dict[str, torch.Tensor]:
    """Residual blocks ``{ours}.resblocks.N`` -> HF's ``{theirs}.layers.N`` (q, k, v split)."""
    out: Dict[str, torch.Tensor] = {}
    layers = 1 + max(int(k[len(ours) :].split(".")[2]) for k in state_dict if k.startswith(f"{ours}.resblocks."))
    for i in range(layers):
        block, layer = f"{ours}.resblocks.{i}", f"{theirs}.layers.{i}"
        for part, weight, bias in zip(
            ("q_proj", "k_proj", "v_proj"),
            state_dict[f"{block}.attn.in_proj_weight"].chunk(3),
            state_dict[f"{block}.attn.in_proj_bias"].chunk(3),
        ):
            out[f"{layer}.self_attn.{part}.weight"], out[f"{layer}.self_attn.{part}.bias"] = weight, bias
        for ours_name, theirs_name in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{layer}.{theirs_name}.weight"] = state_dict[f"{block}.{ours_name}.weight"]
            out[f"{layer}.{theirs_name}.bias"] = state_dict[f"{block}.{ours_name}.bias"]
        out.update(_layer_norm(state_dict, f"{block}.ln_1", f"{layer}.layer_norm1"))
        out.update(_layer_norm(state_dict, f"{block}.ln_2", f"{layer}.layer_norm2"))
    return out


def hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A clipdist ViT CLIP state dict under HF CLIPModel's names (contiguous copies)."""
    out = {
        "logit_scale": state_dict["logit_scale"].reshape(()),  # 0-dim in HF
        "text_model.embeddings.token_embedding.weight": state_dict["text.token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["text.positional_embedding"],
        **_encoder(state_dict, "text.transformer", "text_model.encoder"),
        **_layer_norm(state_dict, "text.ln_final", "text_model.final_layer_norm"),
        "text_projection.weight": state_dict["text.text_projection"].T,  # ours: x @ P; HF: Linear, x @ W.T
        "vision_model.embeddings.patch_embedding.weight": state_dict["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state_dict["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state_dict["visual.positional_embedding"],
        **_layer_norm(state_dict, "visual.ln_pre", "vision_model.pre_layrnorm"),  # sic: HF's name
        **_encoder(state_dict, "visual.transformer", "vision_model.encoder"),
        **_layer_norm(state_dict, "visual.ln_post", "vision_model.post_layernorm"),
        "visual_projection.weight": state_dict["visual.proj"].T,
    }
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: Path) -> None:
    """Write ``out_dir`` as a transformers CLIPModel + CLIPProcessor directory."""
    check_hf_exportable(cfg)
    try:
        from transformers import CLIPConfig, CLIPModel
    except ImportError as error:
        raise ExportError(f"--to hf needs the transformers package (pip install transformers): {error}") from None
    config = CLIPConfig(**hf_config(cfg, float(state_dict["logit_scale"].reshape(()))))
    weights = hf_state_dict(state_dict)
    with torch.device("meta"):  # no random init: every weight comes from the checkpoint
        model = CLIPModel(config)
    problem = state_dict_mismatch(model, weights)
    if problem:  # a transformers version with other names or shapes
        raise ExportError(f"transformers {_transformers_version()} CLIPModel does not fit the converted weights: {problem}")
    model.load_state_dict(weights, strict=True, assign=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors (the default since transformers 4.35)
    write_processor(out_dir, cfg)


def write_processor(out_dir: Path, cfg: ModelConfig) -> None:
    """CLIPProcessor files: the vendored BPE as vocab.json + merges.txt (what every transformers
    version's CLIPTokenizer reads), HF's tokenizer files built from them, and an image processor
    with clipdist's evaluation preprocessing (bicubic shortest-side resize, centre crop, CLIP
    mean/std)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    write_bpe_files(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=cfg.text.context_length)
    size = cfg.vision.image_size
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=PIL_BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out_dir))
    image_processor.save_pretrained(str(out_dir))  # preprocessor_config.json, read by AutoImageProcessor


def write_bpe_files(out_dir: Path) -> None:
    """vocab.json (token -> id, ours exactly) and merges.txt (by rank, as HF/OpenAI publish it)."""
    tokenizer = SimpleTokenizer()
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (out_dir / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
