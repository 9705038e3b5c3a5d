"""The text-conditioned U-Net: diffusers' UNet2DConditionModel (SD 1.x/2.x/XL layouts), NHWC."""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import attention
from ldm_jax.models import config_io
from ldm_jax.models import layers

DOWN_BLOCK_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCK_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')
MID_BLOCK_TYPES = ('UNetMidBlock2DCrossAttn', 'UNetMidBlock2D', None)
ADDITION_EMBED_TYPES = (None, 'text_time')  # 'text_time': SDXL's pooled-text + size conditioning

# diffusers config keys whose non-default values select features outside SD 1.x/2.x/XL (class
# embeddings, Kandinsky's added conditioning, ...): any other value is refused, naming the key.
# (addition_embed_type is also a field: from_diffusers passes its accepted value on.)
_UNSUPPORTED = {
    'act_fn': 'silu', 'only_cross_attention': False, 'dual_cross_attention': False,
    'class_embed_type': None, 'addition_embed_type': ADDITION_EMBED_TYPES,
    'num_class_embeds': None, 'encoder_hid_dim': None,
    'encoder_hid_dim_type': None, 'resnet_time_scale_shift': 'default',
    'resnet_skip_time_act': False, 'resnet_out_scale_factor': 1.0,
    'time_embedding_type': 'positional', 'time_embedding_act_fn': None, 'timestep_post_act': None,
    'time_cond_proj_dim': None, 'attention_type': 'default', 'class_embeddings_concat': False,
    'mid_block_only_cross_attention': (None, False), 'cross_attention_norm': None,
    'reverse_transformer_layers_per_block': None, 'dropout': 0.0,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The U-Net's architecture (diffusers' config.json names) plus runtime options.

  `num_attention_heads` is the number of heads per level; diffusers stores it under the misnamed
  key `attention_head_dim` (diffusers issue #2011), which `from_diffusers` reads.
  """
  sample_size: Any = 64
  in_channels: int = 4  # 9 for the inpainting U-Net: latents + mask + masked-image latents
  out_channels: int = 4
  down_block_types: tuple = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
  up_block_types: tuple = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  mid_block_type: str | None = 'UNetMidBlock2DCrossAttn'
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: Any = 2
  transformer_layers_per_block: Any = 1
  num_attention_heads: Any = 8
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  center_input_sample: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  time_embedding_dim: int | None = None
  # SDXL's added conditioning: with 'text_time', the pooled text embedding (B, P) and the
  # sinusoidal embeddings (width addition_time_embed_dim) of each of the K size/crop/aesthetic
  # ids are concatenated (P + K * addition_time_embed_dim = projection_class_embeddings_input_dim)
  # and added to the time embedding through `add_embedding`.
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  # Runtime options (not in config.json).
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype
  attention_impl: str = 'auto'  # see attention.dot_product_attention
  remat: Any = 'none'  # per ResNet and Transformer2D block: layers.REMAT_POLICIES (or a bool)

  def __post_init__(self):
    object.__setattr__(self, 'remat', layers.remat_policy(self.remat))
    n = len(self.block_out_channels)
    for name in ('layers_per_block', 'transformer_layers_per_block', 'num_attention_heads'):
      object.__setattr__(self, name, config_io.as_tuple(getattr(self, name), n))
    for name in ('down_block_types', 'up_block_types', 'block_out_channels'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    _check_types('down_block_types', self.down_block_types, DOWN_BLOCK_TYPES, n)
    _check_types('up_block_types', self.up_block_types, UP_BLOCK_TYPES, n)
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f'unknown mid_block_type {self.mid_block_type!r}; '
                       f'ldm_jax supports {MID_BLOCK_TYPES}')
    for c, heads in zip(self.block_out_channels, self.num_attention_heads):
      if c % heads or c % self.norm_num_groups:
        raise ValueError(f'block width {c} must be divisible by its {heads} attention heads and '
                         f'by norm_num_groups={self.norm_num_groups}')
    _check_addition(self)
    if self.attention_impl not in attention.IMPLS:
      raise ValueError(f'attention_impl {self.attention_impl!r} is not one of '
                       f'{attention.IMPLS}')

  @property
  def is_xl(self):
    """Whether the U-Net takes SDXL's `added_cond_kwargs` (text_embeds and time_ids)."""
    return self.addition_embed_type == 'text_time'

  @classmethod
  def sd15(cls, **kw):
    """Stable Diffusion 1.x (v1-4, v1-5): 8 heads per level, conv projections, CLIP-L context."""
    return cls(**kw)

  @classmethod
  def sd21(cls, **kw):
    """Stable Diffusion 2.x: head dim 64, linear projections, upcast attention, OpenCLIP-H context."""
    kw = dict(sample_size=96, num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
              use_linear_projection=True, upcast_attention=True) | kw
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw):
    """Two levels, 32/64 channels: for tests and the CPU demo."""
    kw = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
              up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), num_attention_heads=2,
              cross_attention_dim=32, norm_num_groups=8) | kw
    return cls(**kw)

  @classmethod
  def sdxl(cls, **kw):
    """stabilityai/stable-diffusion-xl-base-1.0: 2.567B parameters, no attention at the top level,
    1/2/10 transformer layers, head dim 64, a 2048-wide context (CLIP-L + OpenCLIP-bigG) and the
    pooled bigG embedding (1280) + 6 size/crop ids x 256 as added conditioning."""
    kw = dict(sample_size=128, block_out_channels=(320, 640, 1280),
              down_block_types=('DownBlock2D',) + ('CrossAttnDownBlock2D',) * 2,
              up_block_types=('CrossAttnUpBlock2D',) * 2 + ('UpBlock2D',),
              num_attention_heads=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
              cross_attention_dim=2048, use_linear_projection=True, addition_embed_type='text_time',
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816) | kw
    return cls(**kw)

  @classmethod
  def sdxl_refiner(cls, **kw):
    """stabilityai/stable-diffusion-xl-refiner-1.0: four levels (no attention at either end), 4
    transformer layers, bigG context (1280), pooled bigG + 5 ids (size, crop, aesthetic score)."""
    kw = dict(sample_size=128, block_out_channels=(384, 768, 1536, 1536),
              down_block_types=('DownBlock2D',) + ('CrossAttnDownBlock2D',) * 2 + ('DownBlock2D',),
              up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 2 + ('UpBlock2D',),
              num_attention_heads=(6, 12, 24, 24), transformer_layers_per_block=4,
              cross_attention_dim=1280, use_linear_projection=True, addition_embed_type='text_time',
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560) | kw
    return cls(**kw)

  @classmethod
  def tiny_xl(cls, **kw):
    """diffusers' tiny SDXL test U-Net (32/64 channels, text_time), for tests and the CPU demo:
    a 64-wide context (two 32-wide text encoders), pooled 32 + 6 ids x 8 = 80."""
    kw = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
              down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
              up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), num_attention_heads=(2, 4),
              transformer_layers_per_block=(1, 2), cross_attention_dim=64,
              use_linear_projection=True, norm_num_groups=8, addition_embed_type='text_time',
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=80) | kw
    return cls(**kw)

  @classmethod
  def from_diffusers(cls, raw, **overrides):
    """From a diffusers `unet/config.json` dict; `overrides` set dtype, param_dtype, ..."""
    raw = dict(raw)
    heads = raw.pop('num_attention_heads', None)
    head_key = raw.pop('attention_head_dim', 8)
    addition = {'addition_embed_type': raw.get('addition_embed_type')}
    return config_io.config_from_dict(
        cls, raw | {'num_attention_heads': heads or head_key}, unsupported=_UNSUPPORTED,
        ignored=('addition_embed_type_num_heads',), **(addition | overrides))

  def to_diffusers(self):
    """The diffusers config.json dict (heads written under `attention_head_dim`, as diffusers does)."""
    out = config_io.config_to_dict(self, renames={'num_attention_heads': 'attention_head_dim'})
    out['_class_name'] = 'UNet2DConditionModel'
    out['act_fn'] = 'silu'
    return out


def _check_addition(config):
  """Validates the added-conditioning fields (SDXL's 'text_time' needs both widths)."""
  if config.addition_embed_type not in ADDITION_EMBED_TYPES:
    raise ValueError(f'addition_embed_type={config.addition_embed_type!r} is not supported; '
                     f'ldm_jax supports {ADDITION_EMBED_TYPES} (SD 1.x/2.x: None, SDXL: text_time)')
  if config.is_xl and not (config.addition_time_embed_dim
                           and config.projection_class_embeddings_input_dim):
    raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                     'projection_class_embeddings_input_dim (SDXL base: 256 and 2816)')


def _check_types(field, types, allowed, n):
  if len(types) != n:
    raise ValueError(f'{field} has {len(types)} entries but block_out_channels has {n}')
  for t in types:
    if t not in allowed:
      raise ValueError(f'unknown block type {t!r} in {field}; ldm_jax supports {allowed}')


class GEGLU(nn.Module):
  """Linear to 2x the inner width, then hidden * gelu(gate) with PyTorch's exact GELU."""
  inner: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(2 * self.inner, dtype=self.dtype, param_dtype=self.param_dtype, name='proj')(x)
    hidden, gate = jnp.split(h, 2, axis=-1)  # diffusers' chunk order: [hidden, gate]
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = GEGLU(4 * self.dim, name='net_0', **kw)(x)
    return layers.dense(self.dim, name='net_2', **kw)(x)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to the text context, GEGLU feed-forward."""
  dim: int
  heads: int
  config: UNetConfig

  @nn.compact
  def __call__(self, x, context):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    attn = functools.partial(layers.Attention, self.heads, self.dim // self.heads, self.dim,
                             upcast=c.upcast_attention, impl=c.attention_impl, **kw)
    norm = functools.partial(layers.LayerNorm, 1e-5, c.param_dtype)
    x = x + attn(name='attn1')(norm(name='norm1')(x))
    x = x + attn(name='attn2')(norm(name='norm2')(x), context)
    return x + FeedForward(self.dim, name='ff', **kw)(norm(name='norm3')(x))


class Transformer2DModel(nn.Module):
  """GroupNorm -> proj_in (1x1 conv, or linear for SD 2) -> transformer blocks -> proj_out, + input."""
  heads: int
  depth: int
  config: UNetConfig

  @nn.compact
  def __call__(self, x, context):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    b, h, w, ch = x.shape
    residual = x
    x = layers.GroupNorm(c.norm_num_groups, 1e-6, c.param_dtype, name='norm')(x)
    if c.use_linear_projection:
      x = layers.dense(ch, name='proj_in', **kw)(x.reshape(b, h * w, ch))
    else:
      x = layers.conv(ch, kernel=1, name='proj_in', **kw)(x).reshape(b, h * w, ch)
    for i in range(self.depth):
      x = BasicTransformerBlock(ch, self.heads, c, name=f'transformer_blocks_{i}')(x, context)
    if c.use_linear_projection:
      x = layers.dense(ch, name='proj_out', **kw)(x).reshape(b, h, w, ch)
    else:
      x = layers.conv(ch, kernel=1, name='proj_out', **kw)(x.reshape(b, h, w, ch))
    return x + residual


def _resnet(config, out_channels, name):
  cls = layers.maybe_remat(layers.ResnetBlock2D, config.remat)
  return cls(out_channels, config.norm_num_groups, config.norm_eps, config.dtype,
             config.param_dtype, name=name)


def _transformer(config, heads, depth, name):
  cls = layers.maybe_remat(Transformer2DModel, config.remat)
  return cls(heads, depth, config, name=name)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (with attention) or DownBlock2D; returns the output and its skips."""
  level: int
  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb, context):
    c, i = self.config, self.level
    channels = c.block_out_channels[i]
    skips = []
    for j in range(c.layers_per_block[i]):
      x = _resnet(c, channels, f'resnets_{j}')(x, temb)
      if c.down_block_types[i] == 'CrossAttnDownBlock2D':
        x = _transformer(c, c.num_attention_heads[i], c.transformer_layers_per_block[i],
                         f'attentions_{j}')(x, context)
      skips.append(x)
    if i < len(c.block_out_channels) - 1:
      x = layers.Downsample2D(channels, c.downsample_padding, c.dtype, c.param_dtype,
                              name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D or UpBlock2D: each resnet takes the next skip concatenated on channels."""
  level: int  # index into up_block_types (0 is the lowest resolution)
  config: UNetConfig

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None):
    c, i = self.config, self.level
    rev = len(c.block_out_channels) - 1 - i
    channels = c.block_out_channels[rev]
    for j in range(c.layers_per_block[rev] + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = _resnet(c, channels, f'resnets_{j}')(x, temb)
      if c.up_block_types[i] == 'CrossAttnUpBlock2D':
        x = _transformer(c, c.num_attention_heads[rev], c.transformer_layers_per_block[rev],
                         f'attentions_{j}')(x, context)
    if i < len(c.block_out_channels) - 1:
      x = layers.Upsample2D(channels, c.dtype, c.param_dtype, name='upsamplers_0')(x, upsample_size)
    return x


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn (resnet, attention, resnet) or UNetMidBlock2D (one resnet)."""
  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb, context):
    c = self.config
    channels = c.block_out_channels[-1]
    x = _resnet(c, channels, 'resnets_0')(x, temb) / c.mid_block_scale_factor
    if c.mid_block_type == 'UNetMidBlock2DCrossAttn':
      x = _transformer(c, c.num_attention_heads[-1], c.transformer_layers_per_block[-1],
                       'attentions_0')(x, context)
      x = _resnet(c, channels, 'resnets_1')(x, temb) / c.mid_block_scale_factor
    return x


class TimestepEmbedding(nn.Module):
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.silu(layers.dense(self.dim, name='linear_1', **kw)(x))
    return layers.dense(self.dim, name='linear_2', **kw)(x)


class UNet2DConditionModel(nn.Module):
  """The noise-prediction network.

  `apply({'params': p}, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None)`:
    sample: (B, H, W, in_channels) noisy latents.
    timesteps: scalar or (B,) timesteps (integer or fractional).
    encoder_hidden_states: (B, L, cross_attention_dim) text context.
    added_cond_kwargs: for an XL U-Net (`config.is_xl`) only, as diffusers:
      {'text_embeds': (B, P) pooled text embedding, 'time_ids': (B, K) size/crop ids (SDXL
      base: K=6, original h, w, crop top, left, target h, w; refiner: K=5, original h, w, crop
      top, left, aesthetic score)}, P + K * addition_time_embed_dim =
      projection_class_embeddings_input_dim.
  Returns the prediction (eps, v, ...) shaped (B, H, W, out_channels), in the compute dtype.

  Raises:
    ValueError: an XL U-Net without added_cond_kwargs, or a non-XL one given them.
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    b = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
    temb = layers.timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
    temb_dim = c.time_embedding_dim or 4 * c.block_out_channels[0]
    temb = TimestepEmbedding(temb_dim, name='time_embedding', **kw)(temb.astype(c.dtype))
    aug = _added_embedding(c, b, added_cond_kwargs)
    if aug is not None:
      temb = temb + TimestepEmbedding(temb_dim, name='add_embedding', **kw)(aug)
    context = encoder_hidden_states.astype(c.dtype)

    x = sample.astype(c.dtype)
    if c.center_input_sample:
      x = 2 * x - 1.0
    x = layers.conv(c.block_out_channels[0], c.conv_in_kernel, name='conv_in', **kw)(x)
    skips = [x]
    for i in range(len(c.block_out_channels)):  # (B, H, W, C0) -> (B, H/2^(n-1), W/2^(n-1), C-1)
      x, block_skips = DownBlock(i, c, name=f'down_blocks_{i}')(x, temb, context)
      skips += block_skips
    if c.mid_block_type is not None:
      x = MidBlock(c, name='mid_block')(x, temb, context)
    for i in range(len(c.block_out_channels)):
      n = c.layers_per_block[len(c.block_out_channels) - 1 - i] + 1
      block_skips, skips = skips[-n:], skips[:-n]
      # Upsample to the next skip's size, which is 2x except for odd latent sizes.
      size = skips[-1].shape[1:3] if skips else None
      x = UpBlock(i, c, name=f'up_blocks_{i}')(x, block_skips, temb, context, size)
    x = nn.silu(layers.GroupNorm(c.norm_num_groups, c.norm_eps, c.param_dtype,
                                 name='conv_norm_out')(x))
    return layers.conv(c.out_channels, c.conv_out_kernel, name='conv_out', **kw)(x)


def _added_embedding(config, batch, added_cond_kwargs):
  """diffusers' `get_aug_embed` input for 'text_time': concat(text_embeds, time embeddings).

  Returns:
    (B, projection_class_embeddings_input_dim) in the compute dtype, or None for a non-XL U-Net.

  Raises:
    ValueError: added_cond_kwargs missing (XL) or unexpected (not XL), or of the wrong width.
  """
  c = config
  if not c.is_xl:
    if added_cond_kwargs is not None:
      raise ValueError('added_cond_kwargs were given but this U-Net has no added conditioning '
                       f'(addition_embed_type={c.addition_embed_type!r}); pass them only to an '
                       "SDXL U-Net (addition_embed_type='text_time')")
    return None
  missing = [k for k in ('text_embeds', 'time_ids') if k not in (added_cond_kwargs or {})]
  if missing:
    raise ValueError(f"this SDXL U-Net (addition_embed_type='text_time') needs added_cond_kwargs="
                     "{'text_embeds': (B, P) pooled text embedding, 'time_ids': (B, K) size/crop "
                     f'ids}}; missing {missing}')
  text_embeds = jnp.asarray(added_cond_kwargs['text_embeds'])
  time_ids = jnp.asarray(added_cond_kwargs['time_ids'])
  time_embeds = layers.timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim,
                                          c.flip_sin_to_cos, c.freq_shift)
  time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
  aug = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
  if aug.shape[-1] != c.projection_class_embeddings_input_dim:
    raise ValueError(f'text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give '
                     f'{aug.shape[-1]} added-conditioning features but this U-Net takes '
                     'projection_class_embeddings_input_dim='
                     f'{c.projection_class_embeddings_input_dim} (= P + K * '
                     f'{c.addition_time_embed_dim})')
  return jnp.broadcast_to(aug, (batch, aug.shape[-1])).astype(c.dtype)
