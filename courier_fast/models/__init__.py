"""COURIER's model: the timm image encoder, CourierModel (encoder + ReconstructionAttention + the
losses), the pre-training methods (COURIER and the baselines), augmentation and checkpoints."""
