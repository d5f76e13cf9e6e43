from clipdist.losses.contrastive import GatherClipLoss, build_loss
from clipdist.losses.reference import clip_loss_reference, siglip_loss_reference
from clipdist.losses.ring import RingClipLoss
from clipdist.losses.siglip import SigLipLoss

__all__ = ["GatherClipLoss", "RingClipLoss", "SigLipLoss", "build_loss", "clip_loss_reference", "siglip_loss_reference"]
