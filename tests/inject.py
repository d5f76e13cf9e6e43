"""Run clipdist.train with a fault injected, for tests/test_faults.py (a real run otherwise).

    python tests/inject.py nan-loss RANK STEPS -- OVERRIDES...   # STEPS: e.g. "3,5,8-"
    python tests/inject.py kill-in-save TAG -- OVERRIDES...      # SIGKILL itself mid-write of TAG

Under torchrun: python -m torch.distributed.run ... tests/inject.py nan-loss 0 3,5 -- ...
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import clipdist.train


def calls_in(spec: str, call: int) -> bool:
    """Whether ``call`` is in a spec such as "3,5,8-" (8- : 8 and every later call)."""
    return any(call >= int(item[:-1]) if item.endswith("-") else call == int(item) for item in spec.split(","))


def nan_loss(rank: str, steps: str) -> None:
    """The loss of rank RANK's STEPS-th loss calls (1-based) becomes NaN: its peers' stay finite."""
    build_loss = clipdist.train.build_loss

    def build_faulty_loss(cfg):
        loss_fn, calls = build_loss(cfg), [0]

        def faulty(*outputs):
            calls[0] += 1
            loss = loss_fn(*outputs)
            if int(os.environ.get("RANK", "0")) == int(rank) and calls_in(steps, calls[0]):
                return loss * float("nan")
            return loss

        return faulty

    clipdist.train.build_loss = build_faulty_loss


def kill_in_save(tag: str) -> None:
    """SIGKILL this process after the first file of checkpoint TAG is written: a kill mid-save."""
    save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and f"{tag}.partial" in str(f):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die


if __name__ == "__main__":
    split = sys.argv.index("--")
    fault, args, overrides = sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :]
    {"nan-loss": nan_loss, "kill-in-save": kill_in_save}[fault](*args)
    sys.exit(clipdist.train.main(overrides))
