"""CLIP towers, the model that joins them, and the tokenizer."""

from clipdist.config import ModelConfig
from clipdist.models.clip import CLIP, load_openai_state_dict
from clipdist.models.pretrained import load_pretrained
from clipdist.models.tokenizer import SimpleTokenizer, tokenize


def build_model(cfg: ModelConfig) -> CLIP:
    """The model of ``cfg``, LiT lock applied; towers compiled last, once gradient checkpointing
    (which the compiled graph bakes in) is set."""
    model = CLIP(cfg)
    if cfg.lock_image:
        model.lock_image(cfg.lock_image_unlocked_blocks)
    if cfg.compile:
        model.compile_towers()
    return model


__all__ = ["CLIP", "SimpleTokenizer", "build_model", "load_openai_state_dict", "load_pretrained", "tokenize"]
