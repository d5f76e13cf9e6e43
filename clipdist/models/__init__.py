"""CLIP towers, the model that joins them, and the tokenizer."""

from clipdist.config import ModelConfig
from clipdist.models.clip import CLIP, load_openai_state_dict
from clipdist.models.pretrained import load_pretrained
from clipdist.models.tokenizer import SimpleTokenizer, tokenize


def build_model(cfg: ModelConfig) -> CLIP:
    return CLIP(cfg)


__all__ = ["CLIP", "SimpleTokenizer", "build_model", "load_openai_state_dict", "load_pretrained", "tokenize"]
