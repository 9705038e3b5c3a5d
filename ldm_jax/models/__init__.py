"""The three networks: the U-Net, the KL autoencoder and the CLIP text encoder (Flax Linen, NHWC)."""
