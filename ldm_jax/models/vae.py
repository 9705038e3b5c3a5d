"""The KL autoencoder: diffusers' AutoencoderKL (the SD 1.x/2.x/XL VAE), NHWC."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import attention
from ldm_jax.models import config_io
from ldm_jax.models import layers

_UNSUPPORTED = {
    'act_fn': 'silu', 'shift_factor': None, 'latents_mean': None, 'latents_std': None,
    'down_block_types': (('DownEncoderBlock2D',) * 1, ('DownEncoderBlock2D',) * 2,
                         ('DownEncoderBlock2D',) * 3, ('DownEncoderBlock2D',) * 4),
    'up_block_types': (('UpDecoderBlock2D',) * 1, ('UpDecoderBlock2D',) * 2,
                       ('UpDecoderBlock2D',) * 3, ('UpDecoderBlock2D',) * 4),
}
_EPS = 1e-6  # every norm in the VAE (diffusers' Encoder/Decoder hard-code it)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The autoencoder's architecture (diffusers' config.json names) plus runtime options."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 512
  scaling_factor: float = 0.18215  # latents are multiplied by this before the U-Net sees them
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # Runtime options (not in config.json).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'auto'  # see attention.dot_product_attention
  remat: Any = 'none'  # per ResNet block: layers.REMAT_POLICIES (or a bool)

  def __post_init__(self):
    object.__setattr__(self, 'remat', layers.remat_policy(self.remat))
    object.__setattr__(self, 'block_out_channels', tuple(self.block_out_channels))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f'VAE width {c} is not divisible by norm_num_groups={self.norm_num_groups}')

  @property
  def downsample_factor(self):
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def sd15(cls, **kw):
    """The SD 1.x/2.x VAE (f=8, 4 latent channels): 83.65M parameters."""
    return cls(**kw)

  sd21 = sd15

  @classmethod
  def sdxl(cls, **kw):
    """The SDXL VAE (stabilityai/sdxl-vae): the SD layout retrained, latents scaled by 0.13025;
    it overflows in float16, hence force_upcast."""
    kw = dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True) | kw
    return cls(**kw)

  @classmethod
  def sdxl_fp16_fix(cls, **kw):
    """madebyollin/sdxl-vae-fp16-fix: the SDXL VAE fine-tuned to run in float16 (no upcast)."""
    kw = dict(sample_size=512, scaling_factor=0.13025, force_upcast=False) | kw
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw):
    """Two levels (f=2), 32/64 channels: for tests."""
    kw = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
              sample_size=32) | kw
    return cls(**kw)

  @classmethod
  def from_diffusers(cls, raw, **overrides):
    """From a diffusers `vae/config.json` dict; `overrides` set dtype, param_dtype, ..."""
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return config_io.config_from_dict(cls, raw, unsupported=_UNSUPPORTED, **overrides)

  def to_diffusers(self):
    out = config_io.config_to_dict(self)
    n = len(self.block_out_channels)
    out.update(_class_name='AutoencoderKL', act_fn='silu', down_block_types=['DownEncoderBlock2D'] * n,
               up_block_types=['UpDecoderBlock2D'] * n)
    return out


class MidBlock(nn.Module):
  """UNetMidBlock2D without time: resnet, single-head self-attention over pixels, resnet."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    ch = x.shape[-1]
    x = _resnet(c, ch, 'resnets_0')(x)
    if c.mid_block_add_attention:
      x = AttentionBlock(c, name='attentions_0')(x)
    return _resnet(c, ch, 'resnets_1')(x)


class AttentionBlock(nn.Module):
  """The VAE's attention: GroupNorm, one head as wide as the channels, biased projections, + input."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, h, w, ch = x.shape
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    y = layers.GroupNorm(c.norm_num_groups, _EPS, c.param_dtype, name='group_norm')(x)
    y = y.reshape(b, h * w, 1, ch)  # (B, HW, heads=1, C)
    q, k, v = (layers.dense(ch, name=n, **kw)(y) for n in ('to_q', 'to_k', 'to_v'))
    y = attention.dot_product_attention(q, k, v, impl=c.attention_impl).reshape(b, h * w, ch)
    y = layers.dense(ch, name='to_out_0', **kw)(y)
    return x + y.reshape(b, h, w, ch)


def _resnet(config, out_channels, name):
  cls = layers.maybe_remat(layers.ResnetBlock2D, config.remat)
  return cls(out_channels, config.norm_num_groups, _EPS, config.dtype, config.param_dtype, name=name)


class Encoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    x = layers.conv(c.block_out_channels[0], name='conv_in', **kw)(x)
    for i, ch in enumerate(c.block_out_channels):
      x = DownEncoderBlock(c, i, name=f'down_blocks_{i}')(x)
    x = MidBlock(c, name='mid_block')(x)  # (B, H/f, W/f, C-1)
    x = nn.silu(layers.GroupNorm(c.norm_num_groups, _EPS, c.param_dtype, name='conv_norm_out')(x))
    return layers.conv(2 * c.latent_channels, name='conv_out', **kw)(x)  # mean and logvar


class DownEncoderBlock(nn.Module):
  config: VAEConfig
  level: int

  @nn.compact
  def __call__(self, x):
    c, i = self.config, self.level
    ch = c.block_out_channels[i]
    for j in range(c.layers_per_block):
      x = _resnet(c, ch, f'resnets_{j}')(x)
    if i < len(c.block_out_channels) - 1:
      # LDM's asymmetric downsample: pad right/bottom by one, stride-2 VALID conv.
      x = layers.Downsample2D(ch, 0, c.dtype, c.param_dtype, name='downsamplers_0')(x)
    return x


class UpDecoderBlock(nn.Module):
  config: VAEConfig
  level: int  # 0 is the lowest resolution

  @nn.compact
  def __call__(self, x):
    c, i = self.config, self.level
    ch = c.block_out_channels[::-1][i]
    for j in range(c.layers_per_block + 1):
      x = _resnet(c, ch, f'resnets_{j}')(x)
    if i < len(c.block_out_channels) - 1:
      x = layers.Upsample2D(ch, c.dtype, c.param_dtype, name='upsamplers_0')(x)
    return x


class Decoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    x = layers.conv(c.block_out_channels[-1], name='conv_in', **kw)(z)
    x = MidBlock(c, name='mid_block')(x)
    for i in range(len(c.block_out_channels)):
      x = UpDecoderBlock(c, i, name=f'up_blocks_{i}')(x)
    x = nn.silu(layers.GroupNorm(c.norm_num_groups, _EPS, c.param_dtype, name='conv_norm_out')(x))
    return layers.conv(c.out_channels, name='conv_out', **kw)(x)


class AutoencoderKL(nn.Module):
  """The VAE.

  `apply({'params': p}, images, method='encode') -> (mean, logvar)`: images (B, H, W, 3) in
    [-1, 1]; mean and logvar (B, H/f, W/f, latent_channels), unscaled, float32, logvar clipped
    to [-30, 20] as diffusers does.
  `apply({'params': p}, latents, method='decode') -> images`: unscaled latents to (B, H, W, 3).
  `apply({'params': p}, images, key)` encodes, samples the posterior with `key` and decodes
    (deterministically from the mean when `key` is None); it returns (images, mean, logvar).
  """
  config: VAEConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    if c.use_quant_conv:
      self.quant_conv = layers.conv(2 * c.latent_channels, kernel=1, **kw)
    if c.use_post_quant_conv:
      self.post_quant_conv = layers.conv(c.latent_channels, kernel=1, **kw)

  def encode(self, images):
    moments = self.encoder(images.astype(self.config.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    z = latents.astype(self.config.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images, key=None):
    mean, logvar = self.encode(images)
    z = mean
    if key is not None:
      z = sample_posterior(mean, logvar, jax.random.normal(key, mean.shape, mean.dtype))
    return self.decode(z), mean, logvar


def sample_posterior(mean, logvar, noise):
  """A sample of the diagonal Gaussian posterior (mean, logvar) from standard normal `noise`."""
  return mean + jnp.exp(0.5 * logvar) * noise
