"""Hydra multirun entry point, for sweeps through a Hydra launcher (conf/hydra/launcher/):

    python -m clipdist.sweep -m hydra/launcher=clipdist_slurm +experiment=vitb32 optim.lr=3e-4,1e-3

Each sweep point trains in its own Hydra job directory (its train.output_dir) and resumes from it
when requeued. Single runs use `python -m clipdist.train` (torchrun, srun), which needs no Hydra
run directory of its own.
"""

from __future__ import annotations

from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from clipdist.config import CONF_DIR, ConfigError, register_configs, validate
from clipdist.distributed import DistEnv
from clipdist.log import setup_console_logging

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def sweep_point(dict_cfg: DictConfig) -> Optional[float]:
    """One sweep point, on every rank of its job: returns its final loss (Hydra's job return)."""
    from clipdist.train import train  # after Hydra has set up the job: keeps --help fast

    env = DistEnv.from_environ()
    setup_console_logging(env.rank)
    with_job_dir = OmegaConf.merge(dict_cfg, {"train": {"output_dir": HydraConfig.get().runtime.output_dir}})
    if with_job_dir.train.resume is None:
        with_job_dir.train.resume = "auto"  # a requeued sweep point continues its own run
    cfg = OmegaConf.to_object(with_job_dir)
    try:
        validate(cfg, env.world_size)
    except ConfigError as error:
        raise SystemExit(f"clipdist: config error: {error}") from None
    summary = train(cfg, env, OmegaConf.to_container(with_job_dir, resolve=True))
    return summary.get("final_loss")


if __name__ == "__main__":
    sweep_point()
