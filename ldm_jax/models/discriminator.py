"""The NLayer PatchGAN discriminator of taming-transformers / LDM's autoencoder loss, NHWC."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import layers

NORMS = ('group', 'none')


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  """taming's `NLayerDiscriminator(input_nc, ndf, n_layers)`, with a stateless norm."""
  in_channels: int = 3  # input_nc
  base_channels: int = 64  # ndf
  n_layers: int = 3
  norm: str = 'group'  # 'group' (GroupNorm) or 'none'; never BatchNorm (see the module docstring)
  norm_num_groups: int = 32
  leaky_slope: float = 0.2
  # Runtime options.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f'discriminator norm {self.norm!r} is not one of {NORMS}')
    if self.n_layers < 1:
      raise ValueError(f'n_layers={self.n_layers}: the PatchGAN needs at least one norm block')
    if self.norm == 'group':
      for ch in self.channels[1:]:
        if ch % self.norm_num_groups:
          raise ValueError(f'discriminator width {ch} is not divisible by '
                           f'norm_num_groups={self.norm_num_groups}')

  @property
  def channels(self):
    """Output channels of the n_layers + 1 feature convs: ndf * min(2**n, 8) for n = 0..n_layers."""
    return tuple(self.base_channels * min(2 ** n, 8) for n in range(self.n_layers + 1))

  @classmethod
  def ldm(cls, **kw):
    """LDM's autoencoder discriminator (disc_in_channels=3, ndf=64, disc_num_layers=3): 70x70
    receptive field, (B, H/8 - 2, W/8 - 2, 1) logits."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw):
    """ndf 16, 2 layers, 8 groups: (B, 6, 6, 1) logits on 32x32 images. For tests."""
    kw = dict(base_channels=16, n_layers=2, norm_num_groups=8) | kw
    return cls(**kw)


def _conv(features, stride, use_bias, config, name):
  """taming's Conv2d(kernel 4, padding 1), initialised N(0, 0.02) as its `weights_init` does."""
  return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 use_bias=use_bias, kernel_init=nn.initializers.normal(0.02),
                 dtype=config.dtype, param_dtype=config.param_dtype, name=name)


class NLayerDiscriminator(nn.Module):
  """PatchGAN discriminator: per-patch real/fake logits.

  `apply({'params': p}, images) -> logits`: images (B, H, W, in_channels) NHWC in [-1, 1];
  logits (B, H', W', 1) in float32, one per overlapping patch, with H' = H / 2**n_layers - 2 for
  H divisible by 2**n_layers (the last two convs are stride 1, kernel 4, padding 1: -1 each).

  Layers, as taming-transformers' `NLayerDiscriminator`:
    conv 4x4 stride 2 (bias) -> leaky ReLU 0.2;
    (n_layers - 1) x [conv 4x4 stride 2 -> norm -> leaky ReLU 0.2], widths ndf * min(2**n, 8);
    conv 4x4 stride 1 -> norm -> leaky ReLU 0.2;
    conv 4x4 stride 1 to 1 channel (bias).
  Submodules are named `main_{i}` after the index in taming's `nn.Sequential`, so `main_2/kernel`
  is `main.2.weight`; norms sit at the BatchNorm's index (`main_3`, ...).

  Normalisation: taming uses BatchNorm2d, whose running statistics would make this a module with
  mutable `batch_stats` state that must be threaded through `apply(..., mutable=...)`, synced
  across devices and kept out of the optimiser. Here norm is GroupNorm (float32, per example, no
  state) or none, so `apply({'params': p}, x)` is a pure function and one parameter tree is all
  the trainer carries. As with BatchNorm, the convs followed by a norm have no bias (it would be
  absorbed by the norm's shift); with `norm='none'` they get one.
  """
  config: DiscriminatorConfig

  @nn.compact
  def __call__(self, images):
    c = self.config
    chans, with_norm = c.channels, c.norm == 'group'
    x = _conv(chans[0], 2, True, c, 'main_0')(images.astype(c.dtype))  # (B, H/2, W/2, ndf)
    x = nn.leaky_relu(x, c.leaky_slope)
    index = 2
    for n in range(1, c.n_layers + 1):
      stride = 2 if n < c.n_layers else 1  # the last norm block keeps the resolution (-1)
      x = _conv(chans[n], stride, not with_norm, c, f'main_{index}')(x)
      if with_norm:
        x = layers.GroupNorm(c.norm_num_groups, 1e-5, c.param_dtype, name=f'main_{index + 1}')(x)
      x = nn.leaky_relu(x, c.leaky_slope)
      index += 3  # conv, norm, activation: taming's Sequential indices with BatchNorm
    x = _conv(1, 1, True, c, f'main_{index}')(x)  # (B, H', W', 1)
    # Logits in float32: the hinge and generator losses average them.
    return x.astype(jnp.float32)
