"""Hydra multirun: one training job per sweep point, through a Hydra launcher (conf/hydra/launcher/):

    python -m clipdist.train -m hydra/launcher=clipdist_slurm +experiment=vitb32 optim.lr=3e-4,1e-3

``python -m clipdist.sweep`` (``clipdist-sweep``) is the same command. Each point trains in its
own Hydra job directory (hydra.sweep.dir/hydra.sweep.subdir) unless train.output_dir names
another, and resumes from it when requeued.
"""

from __future__ import annotations

from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

# train.output_dir's default (clipdist.config.TrainConfig): Hydra's directory of a single run.
HYDRA_RUN_DIR = "${hydra:run.dir}"


def sweep_point(dict_cfg: DictConfig) -> Optional[float]:
    """One sweep point, on every rank of its job: returns its final loss (Hydra's job return)."""
    from hydra.core.hydra_config import HydraConfig

    from clipdist.config import ConfigError, validate
    from clipdist.data import DataError
    from clipdist.distributed import DistEnv
    from clipdist.log import setup_console_logging
    from clipdist.train import train

    env = DistEnv.from_environ()
    setup_console_logging(env.rank)
    point = OmegaConf.merge(dict_cfg, {})
    if OmegaConf.to_container(dict_cfg.train)["output_dir"] == HYDRA_RUN_DIR:
        point.train.output_dir = HydraConfig.get().runtime.output_dir
    if point.train.resume is None:
        point.train.resume = "auto"  # a requeued sweep point continues its own run
    cfg = OmegaConf.to_object(point)
    try:
        validate(cfg, env.world_size)
        summary = train(cfg, env, OmegaConf.to_container(point, resolve=True))
    except ConfigError as error:
        raise SystemExit(f"clipdist: config error: {error}") from None
    except DataError as error:
        raise SystemExit(f"clipdist: data error: {error}") from None
    return summary.get("final_loss")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from clipdist.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
