"""Building blocks shared by the U-Net, the VAE and the text encoder.

Submodule names mirror diffusers' PyTorch modules so that parameter paths line up with state-dict
keys (`resnets_0/conv1/kernel` is `resnets.0.conv1.weight`). Everything is NHWC.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import attention

Dtype = Any


class GroupNorm(nn.Module):
  """GroupNorm in float32 with PyTorch's two-pass variance; returns the input dtype."""
  num_groups: int = 32
  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    b, per_group = x.shape[0], c // self.num_groups
    y = x.astype(jnp.float32).reshape(b, -1, c)  # (B, H*W, C)
    count = y.shape[1] * per_group

    def group_mean(channel_sums):  # (B, C) -> (B, 1, C): each channel gets its group's mean
      sums = channel_sums.reshape(b, self.num_groups, per_group).sum(-1)
      return jnp.repeat(sums / count, per_group, axis=-1)[:, None, :]

    # Summing over the spatial axis first keeps the channels contiguous and vectorised: 2-3x
    # faster than one reduction over (H, W, C/G) on XLA:CPU (bench/NOTES.md).
    mean = group_mean(y.sum(axis=1))
    var = group_mean(jnp.square(y - mean).sum(axis=1))
    # The normalisation and the affine folded into one scale and shift per (example, channel).
    a = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = y * a + (bias.astype(jnp.float32) - mean * a)
    return y.reshape(x.shape).astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32 with two-pass variance; returns the input dtype."""
  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    y = x.astype(jnp.float32)
    mean = y.mean(axis=-1, keepdims=True)
    var = jnp.square(y - mean).mean(axis=-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def conv(features, kernel=3, stride=1, padding=None, dtype=jnp.float32, param_dtype=jnp.float32,
         name=None):
  """A PyTorch-style Conv2d: symmetric padding kernel//2 unless given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, name=name)


def dense(features, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, name=None):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
  """Sinusoidal timestep embedding, as diffusers' `get_timestep_embedding`, in float32.

  Args:
    timesteps: (B,) integer or fractional timesteps.
    dim: embedding width.
    flip_sin_to_cos: put the cosines first (SD: True).
    freq_shift: diffusers' `downscale_freq_shift` (SD: 0).
    max_period: the longest period.

  Returns:
    (B, dim) float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def activation(name):
  """The activation functions the configs name, with PyTorch's definitions."""
  table = {
      'silu': nn.silu,
      'swish': nn.silu,
      'gelu': lambda x: nn.gelu(x, approximate=False),
      'gelu_new': lambda x: nn.gelu(x, approximate=True),
      'quick_gelu': lambda x: x * nn.sigmoid(1.702 * x),
  }
  if name not in table:
    raise ValueError(f'activation {name!r} is not supported; use one of {sorted(table)}')
  return table[name]


def resize_nearest(x, height, width):
  """PyTorch `F.interpolate(mode='nearest')` on NHWC: source index floor(dst * in / out)."""
  _, h, w, _ = x.shape
  if (height, width) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.floor(np.arange(height) * (h / height)).astype(np.int32)
  cols = np.floor(np.arange(width) * (w / width)).astype(np.int32)
  return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D: norm1 -> silu -> conv1 (+ time) -> norm2 -> silu -> conv2, + shortcut."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(self.groups, self.eps, self.param_dtype, name='norm1')(x)
    h = conv(self.out_channels, name='conv1', **kw)(nn.silu(h))
    if temb is not None:
      h = h + dense(self.out_channels, name='time_emb_proj', **kw)(nn.silu(temb))[:, None, None, :]
    h = GroupNorm(self.groups, self.eps, self.param_dtype, name='norm2')(h)
    h = conv(self.out_channels, name='conv2', **kw)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, kernel=1, name='conv_shortcut', **kw)(x)
    return x + h


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding=0` is the VAE's variant: pad right/bottom by one, then VALID."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      pad = 'VALID'
    else:
      pad = ((self.padding, self.padding),) * 2
    return conv(self.out_channels, stride=2, padding=pad, dtype=self.dtype,
                param_dtype=self.param_dtype, name='conv')(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (2x, or to `size`) followed by a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    _, h, w, _ = x.shape
    height, width = size if size is not None else (2 * h, 2 * w)
    x = resize_nearest(x, height, width)
    return conv(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)


class Attention(nn.Module):
  """diffusers Attention: to_q/to_k/to_v (+ optional bias) -> multi-head attention -> to_out_0.

  Self-attention when `context` is None, cross-attention to `context` otherwise.
  """
  heads: int
  dim_head: int
  out_dim: int
  bias: bool = False
  upcast: bool = False
  impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = x if context is None else context
    inner = self.heads * self.dim_head
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))
    q = split(dense(inner, self.bias, name='to_q', **kw)(x))
    k = split(dense(inner, self.bias, name='to_k', **kw)(context))
    v = split(dense(inner, self.bias, name='to_v', **kw)(context))
    out = attention.dot_product_attention(q, k, v, impl=self.impl, upcast=self.upcast)
    out = out.reshape(out.shape[:2] + (inner,))
    return dense(self.out_dim, name='to_out_0', **kw)(out)


# What a rematerialised block keeps from its forward pass for the backward pass:
#   'none': no remat (everything is kept), 'full': only the block's inputs (all is recomputed),
#   'save_dots': also the outputs of matmuls without batch dimensions (the linear projections;
#   not the attention logits, not convolutions), MaxText's usual compromise.
REMAT_POLICIES = ('none', 'full', 'save_dots')


def remat_policy(remat):
  """The policy name for a config's `remat`: one of REMAT_POLICIES, or a bool (True: 'full').

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if isinstance(remat, str) and remat.lower() in ('true', 'false'):  # --config.model.remat=True
    remat = remat.lower() == 'true'
  if isinstance(remat, bool):  # configs and checkpoints from before the policies
    return 'full' if remat else 'none'
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat {remat!r} is not one of {REMAT_POLICIES} (or True/False)')
  return remat


def maybe_remat(module_cls, remat):
  """`module_cls` under `nn.remat` with the policy `remat` names; the class itself for 'none'."""
  policy = remat_policy(remat)
  if policy == 'none':
    return module_cls
  saveable = {'full': None,
              'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
  return nn.remat(module_cls, policy=saveable)
