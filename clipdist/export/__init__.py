"""Take a trained run to other frameworks: ``python -m clipdist.export RUN_DIR --to hf OUT_DIR``
(transformers CLIPModel + CLIPProcessor, ViT models) or ``--to open_clip OUT.pt`` (OpenCLIP state
dict + model config JSON, ViT and ResNet). The reverse direction is ``model.pretrained=PATH``
(clipdist.models.load_pretrained)."""

from clipdist.engine.checkpoint_weights import checkpoint_state_dict
from clipdist.export.hf import check_hf_exportable, export_hf, hf_config, hf_state_dict
from clipdist.export.open_clip import BUILTIN_CONFIGS, builtin_name, export_open_clip, open_clip_model_cfg
from clipdist.export.run import ExportError, load_run_model, run_model_config

__all__ = [
    "BUILTIN_CONFIGS",
    "ExportError",
    "builtin_name",
    "check_hf_exportable",
    "checkpoint_state_dict",
    "export_hf",
    "export_open_clip",
    "hf_config",
    "hf_state_dict",
    "load_run_model",
    "open_clip_model_cfg",
    "run_model_config",
]
