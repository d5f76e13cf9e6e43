from clipdist.losses.contrastive import GatherClipLoss, build_loss
from clipdist.losses.reference import clip_loss_reference

__all__ = ["GatherClipLoss", "build_loss", "clip_loss_reference"]
