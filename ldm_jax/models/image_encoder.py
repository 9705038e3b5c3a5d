"""A small ViT image tower for CLIP-style contrastive pretraining of the text encoder."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import layers
from ldm_jax.models import text_encoder


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
  """The ViT's architecture plus runtime options (the text encoder's names where they overlap)."""
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  projection_dim: int = 512
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-5
  # Runtime options.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'auto'  # see attention.dot_product_attention
  remat: Any = 'none'  # per encoder layer: layers.REMAT_POLICIES (or a bool)

  def __post_init__(self):
    object.__setattr__(self, 'remat', layers.remat_policy(self.remat))
    layers.activation(self.hidden_act)  # fails early on an unknown activation
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size '
                       f'{self.patch_size}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads')

  @property
  def num_patches(self):
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def b16(cls, **kw):
    """ViT-B/16 at 224 px with a 512-wide projection (CLIP ViT-B/16's shape, mean-pooled)."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw):
    """32x32 images, 4x4 patches (64 tokens), width 64, 2 layers, 4 heads: for tests and toys."""
    kw = dict(image_size=32, patch_size=4, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256,
              projection_dim=64) | kw
    return cls(**kw)


def transformer_config(config):
  """The text encoder's config for the same pre-LN blocks: the tower reuses its Encoder."""
  return text_encoder.TextEncoderConfig(
      hidden_size=config.hidden_size, intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps, dtype=config.dtype,
      param_dtype=config.param_dtype, attention_impl=config.attention_impl, remat=config.remat)


class ViTImageEncoder(nn.Module):
  """The image tower.

  `apply({'params': p}, images) -> (B, projection_dim)` embeddings, unnormalised (the contrastive
  loss L2-normalises them, as CLIP does), in the compute dtype. `images` is (B, H, W, C) NHWC in
  [-1, 1] with H = W = `image_size`.

  Pooling is the mean over patch tokens, not a CLS token. Beyer et al. 2022 ("Better plain ViT
  baselines") found global average pooling as good or better than a CLS token and it is
  big_vision's default; it needs no extra token or special position, every patch receives the
  pooled gradient directly (which helps a 2-layer tower on 64 tokens learn fast), and the result
  is invariant to how many tokens there are should the trainer change `image_size`.

  Parameter names follow transformers' CLIPVisionModel where the layers coincide
  (`patch_embedding`, `position_embedding`, `encoder/layers_{i}/self_attn/q_proj`, `mlp/fc1`,
  `post_layernorm`, `visual_projection`); there is no `class_embedding` and no `pre_layrnorm`. As
  in CLIP, the final LayerNorm normalises the pooled vector (big_vision instead normalises every
  token and then pools; with one LN on the pooled vector the projection always sees unit scale).
  """
  config: ImageEncoderConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.patch_embedding = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                                   strides=(c.patch_size, c.patch_size), padding='VALID', **kw)
    self.position_embedding = self.param('position_embedding', nn.initializers.normal(0.02),
                                         (c.num_patches, c.hidden_size), c.param_dtype)
    self.encoder = text_encoder.Encoder(transformer_config(c))  # the same blocks, no mask
    self.post_layernorm = layers.LayerNorm(c.layer_norm_eps, c.param_dtype)
    self.visual_projection = layers.dense(c.projection_dim, use_bias=False, **kw)

  def __call__(self, images):
    c = self.config
    b, h, w, _ = images.shape
    if (h, w) != (c.image_size, c.image_size):
      raise ValueError(f'images are {h}x{w}; this image encoder takes {c.image_size}x'
                       f'{c.image_size} (learned position embeddings fix the size)')
    x = self.patch_embedding(images.astype(c.dtype))  # (B, H/p, W/p, D)
    x = x.reshape(b, -1, c.hidden_size) + self.position_embedding.astype(c.dtype)[None]  # (B, N, D)
    x = self.encoder(x, None)[-1]  # (B, N, D): every patch attends to every patch
    # Mean over tokens in float32 (64+ bf16 summands lose precision), then the final LN.
    pooled = x.astype(jnp.float32).mean(axis=1).astype(c.dtype)  # (B, D)
    return self.visual_projection(self.post_layernorm(pooled))  # (B, projection_dim)
