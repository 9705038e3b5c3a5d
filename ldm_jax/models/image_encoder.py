"""The CLIP ViT image tower: transformers' CLIPVisionModelWithProjection (CLIP score, unCLIP, the
clip stage's image side)."""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import config_io
from ldm_jax.models import layers
from ldm_jax.models import text_encoder

_IGNORED = ('architectures', 'model_type', 'transformers_version', 'torch_dtype', 'dtype',
            'initializer_range', 'initializer_factor', 'attention_dropout', 'dropout',
            'output_attentions', 'output_hidden_states', 'return_dict', 'use_return_dict',
            'id2label', 'label2id', 'is_decoder')
POOLINGS = ('cls', 'mean')


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT (transformers' CLIPVisionConfig names and defaults: ViT-B/32) plus our options."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  with_projection: bool = True  # CLIPVisionModelWithProjection: adds visual_projection
  # 'cls': post_layernorm of the class token (CLIP). 'mean': post_layernorm of the mean over the
  # patch tokens (the clip stage's small towers; Beyer et al. 2022, "Better plain ViT baselines").
  pooling: str = 'cls'
  # Runtime options (not in config.json).
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
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'{self.num_attention_heads} heads')
    if self.pooling not in POOLINGS:
      raise ValueError(f'pooling {self.pooling!r} is not one of {POOLINGS}')

  @property
  def num_patches(self):
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def clip_l14(cls, **kw):
    """OpenAI CLIP ViT-L/14 (SD 1.x's CLIP), 224 px: 303.97M parameters with the projection."""
    kw = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, patch_size=14, projection_dim=768) | kw
    return cls(**kw)

  @classmethod
  def openclip_h14(cls, **kw):
    """OpenCLIP ViT-H/14 (SD 2.x's CLIP; MLPerf's CLIP score), 224 px: 632.08M parameters."""
    kw = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=16, patch_size=14, projection_dim=1024, hidden_act='gelu') | kw
    return cls(**kw)

  @classmethod
  def openclip_bigg14(cls, **kw):
    """OpenCLIP ViT-bigG/14 (SDXL's second text tower's CLIP), 224 px: 1844.91M parameters."""
    kw = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
              num_attention_heads=16, patch_size=14, projection_dim=1280, hidden_act='gelu') | kw
    return cls(**kw)

  @classmethod
  def b16(cls, **kw):
    """ViT-B/16 at 224 px with a 512-wide projection (CLIP ViT-B/16's shape)."""
    return cls(**(dict(patch_size=16) | kw))

  @classmethod
  def tiny(cls, **kw):
    """32x32 images, 4x4 patches (64 tokens), width 64, 2 layers, 4 heads: for tests and toys."""
    kw = dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=4, projection_dim=64, hidden_act='gelu') | kw
    return cls(**kw)

  @classmethod
  def from_transformers(cls, raw, **overrides):
    """From a transformers CLIPVisionConfig dict, or a full CLIPModel config.json (its vision part
    and its top-level projection_dim, which is the one CLIPModel's projections use)."""
    raw = dict(raw)
    kw = {'with_projection': 'CLIPVisionModel' not in (raw.get('architectures') or [])}
    if raw.get('model_type') == 'clip':
      kw['projection_dim'] = raw.get('projection_dim', 512)
      raw = dict(raw.get('vision_config', {}))
    return config_io.config_from_dict(cls, raw, ignored=_IGNORED, **(kw | overrides))

  def to_transformers(self):
    out = config_io.config_to_dict(self)
    if out.pop('pooling') != 'cls':
      raise ValueError('transformers has no mean-pooled CLIP vision model: only pooling="cls" '
                       'towers can be written as a transformers config')
    arch = 'CLIPVisionModelWithProjection' if out.pop('with_projection') else 'CLIPVisionModel'
    return out | {'architectures': [arch], 'model_type': 'clip_vision_model',
                  'torch_dtype': 'float32'}


def example_inputs(config, batch=1):
  """The inputs that trace the tower: (B, image_size, image_size, num_channels) zeros."""
  return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels)),)


def transformer_config(config):
  """The text encoder's config for the same pre-LN blocks: the tower reuses its Encoder."""
  return text_encoder.TextEncoderConfig(
      hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
      hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps, dtype=config.dtype,
      param_dtype=config.param_dtype, attention_impl=config.attention_impl, remat=config.remat)


@flax.struct.dataclass
class VisionOutput:
  last_hidden_state: Any  # (B, 1 + N, D): the last layer's tokens (class token first), no LN
  pooler_output: Any  # (B, D): post_layernorm of the class token (or of the patch mean)
  hidden_states: tuple  # pre_layrnorm's output, then each layer's output
  image_embeds: Any = None  # (B, projection_dim) with `with_projection`


class VisionEmbeddings(nn.Module):
  """Patches (a bias-free strided conv), a learned class token, learned positions."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    b = pixel_values.shape[0]
    # transformers' init: the class token N(0, 1/D), positions N(0, 0.02^2).
    cls_token = self.param('class_embedding', nn.initializers.normal(c.hidden_size ** -0.5),
                           (c.hidden_size,), c.param_dtype)
    x = nn.Conv(c.hidden_size, (c.patch_size,) * 2, strides=(c.patch_size,) * 2, padding='VALID',
                use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                name='patch_embedding')(pixel_values.astype(c.dtype))  # (B, H/p, W/p, D)
    x = x.reshape(b, -1, c.hidden_size)  # (B, N, D), row-major patches as torch's flatten(2)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(c.dtype), (b, 1, c.hidden_size)), x], 1)
    pos = nn.Embed(c.num_patches + 1, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                   dtype=c.dtype, param_dtype=c.param_dtype, name='position_embedding')
    return x + pos(jnp.arange(c.num_patches + 1))[None]  # (B, 1 + N, D)


class CLIPVisionModel(nn.Module):
  """The image tower.

  `apply({'params': p}, pixel_values) -> VisionOutput`:
    pixel_values: (B, H, W, C) NHWC with H = W = `image_size`, normalised as the weights expect
      (CLIP: resized, centre-cropped, (x/255 - mean) / std; see evaluation.clip_score). The clip
      stage feeds its [-1, 1] images as they are.
  `image_embeds` are unnormalised (CLIP score and the contrastive loss L2-normalise them).

  Parameter paths are transformers' keys without `vision_model.`: `embeddings/class_embedding`,
  `embeddings/patch_embedding`, `embeddings/position_embedding`, `pre_layrnorm` (sic),
  `encoder/layers_{i}/{self_attn,mlp,layer_norm1,layer_norm2}`, `post_layernorm`,
  `visual_projection`.
  """
  config: VisionConfig

  def setup(self):
    c = self.config
    self.embeddings = VisionEmbeddings(c)
    self.pre_layrnorm = layers.LayerNorm(c.layer_norm_eps, c.param_dtype)
    self.encoder = text_encoder.Encoder(transformer_config(c))  # the same blocks, no mask
    self.post_layernorm = layers.LayerNorm(c.layer_norm_eps, c.param_dtype)
    if c.with_projection:
      self.visual_projection = layers.dense(c.projection_dim, use_bias=False, dtype=c.dtype,
                                            param_dtype=c.param_dtype)

  def __call__(self, pixel_values):
    c = self.config
    _, h, w, channels = pixel_values.shape
    if (h, w, channels) != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f'images are {h}x{w}x{channels}; this image tower takes {c.image_size}x'
                       f'{c.image_size}x{c.num_channels} (learned position embeddings fix the '
                       'size): resize and crop them first (evaluation.clip_score.preprocess)')
    hidden_states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), None)
    last = hidden_states[-1]  # (B, 1 + N, D): every token attends to every token
    if c.pooling == 'cls':
      pooled = last[:, 0]
    else:  # the mean in float32: 64+ bf16 summands lose precision
      pooled = last[:, 1:].astype(jnp.float32).mean(axis=1).astype(last.dtype)
    pooled = self.post_layernorm(pooled)  # (B, D)
    embeds = self.visual_projection(pooled) if c.with_projection else None
    return VisionOutput(last, pooled, hidden_states, embeds)
