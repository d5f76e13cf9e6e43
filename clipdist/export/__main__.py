"""python -m clipdist.export RUN_DIR --to hf OUT_DIR | --to open_clip OUT.pt"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from clipdist.config import ConfigError
from clipdist.export.hf import check_hf_exportable, export_hf
from clipdist.export.open_clip import export_open_clip, local_dir_path, write_open_clip_local_dir
from clipdist.export.run import ExportError, checkpoint_dir, model_from_checkpoint, run_model_config


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clipdist.export",
        description="Export a clipdist training run's model to Hugging Face transformers or OpenCLIP.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (train.output_dir, e.g. runs/digits)")
    parser.add_argument("--to", required=True, choices=("hf", "open_clip"), help="hf: a CLIPModel directory; open_clip: a state dict file, its config, and open_clip's local-dir folder")
    parser.add_argument("out", type=Path, help="hf: output directory; open_clip: weights file (.pt or .safetensors), config beside it as .json, local-dir folder as OUT without suffix")
    parser.add_argument("--checkpoint", help="a checkpoint directory or tag (step_00000150); default: the run's latest")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override giving the run's config when its run_info.json is missing (repeatable, e.g. --override +experiment=digits)",
    )
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> str:
    """Export as ``args`` say; returns what to tell the user."""
    cfg = run_model_config(args.run_dir, args.override)
    if args.to == "hf":
        check_hf_exportable(cfg)  # before the (possibly large) checkpoint is read
    else:
        local_dir_path(args.out)  # refuses a weights file name open_clip's local-dir cannot take
    checkpoint = checkpoint_dir(args.run_dir, args.checkpoint)
    state_dict = model_from_checkpoint(cfg, checkpoint).state_dict()
    if args.to == "hf":
        export_hf(state_dict, cfg, args.out)
        return f"wrote {args.out} from {checkpoint}: transformers.CLIPModel.from_pretrained({str(args.out)!r}), CLIPProcessor.from_pretrained({str(args.out)!r})"
    config_path, name = export_open_clip(state_dict, cfg, args.out)
    local_dir = write_open_clip_local_dir(args.out, cfg)
    usage = (
        f"open_clip.create_model_and_transforms({name!r}, pretrained={str(args.out)!r})"
        if name
        else f"open_clip.add_model_config({str(config_path)!r}); open_clip.create_model_and_transforms({config_path.stem!r}, pretrained={str(args.out)!r})"
    )
    return (
        f"wrote {args.out} and {config_path} from {checkpoint}: {usage}\n"
        f"wrote {local_dir}/ (open_clip local-dir): open_clip.create_model_and_transforms('local-dir:{local_dir}'); "
        f"clip_benchmark eval --model local-dir:{local_dir} --pretrained '' --output result.json --dataset wds/NAME --dataset_root ROOT"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        print(export(args))
    except (ExportError, ConfigError, FileNotFoundError) as error:
        print(f"clipdist.export: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
