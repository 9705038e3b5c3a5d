"""The FID Inception-v3: TF's 2015-12-05 graph as pytorch-fid and torch-fidelity build it, NHWC.

This is not torchvision's Inception-v3. The FID network reproduces the TensorFlow graph the FID
was defined with, which differs from torchvision's in three places (pytorch-fid's
`FIDInceptionA/C/E_1/E_2`, torch-fidelity's `InceptionA/C/E_1/E_2`): the average pools of the
A, C and first E blocks leave the zero padding out of the average (`count_include_pad=False`),
the second E block's pool branch is a max pool, and the classifier has 1008 classes. Weights:
`pt_inception-2015-12-05-6726825d.pth` through `ldm_jax.convert.inception`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299  # the graph's input resolution: images are resized to it before the network
FEATURE_DIM = 2048  # the pool_3 features the FID and KID use
# What the network can return, in network order (torch-fidelity's names; see FIDInceptionV3).
OUTPUTS = ('64', '192', '768', '2048', 'logits')


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  """The FID Inception's fixed architecture plus runtime options."""
  num_classes: int = 1008  # TF's 1000 ImageNet classes plus 8 unused ones
  bn_eps: float = 1e-3  # TensorFlow's batch-norm epsilon (torchvision's BasicConv2d: 0.001)
  # Runtime options.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # float32 convolutions at full precision: on GPUs XLA's default runs them in TF32 (10-bit
  # mantissa), which moves the features by ~1e-3 and a published FID in its second decimal.
  precision: str = 'highest'

  def __post_init__(self):
    if self.precision not in ('default', 'high', 'highest'):
      raise ValueError(f'precision={self.precision!r} is not one of default, high, highest')

  @classmethod
  def fid(cls, **kw):
    """The network of `pt_inception-2015-12-05` (the only shape these weights come in)."""
    return cls(**kw)


class BatchNorm(nn.Module):
  """Inference batch norm from stored statistics, in float32; returns the input dtype.

  The network is never trained here, so the running statistics are ordinary (frozen) parameters
  `mean` and `var` beside `scale` and `bias`: `apply({'params': p}, x)` is all it takes.
  """
  epsilon: float = 1e-3
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    mean = self.param('mean', nn.initializers.zeros, (c,), self.param_dtype)
    var = self.param('var', nn.initializers.ones, (c,), self.param_dtype)
    f32 = lambda a: a.astype(jnp.float32)
    a = jax.lax.rsqrt(f32(var) + self.epsilon) * f32(scale)
    return (x.astype(jnp.float32) * a + (f32(bias) - f32(mean) * a)).astype(x.dtype)


class BasicConv2d(nn.Module):
  """conv (no bias) -> batch norm -> ReLU, named `conv` and `bn` as in torchvision."""
  features: int
  kernel: tuple = (1, 1)
  stride: int = 1
  padding: tuple = (0, 0)  # (pad_h, pad_w), symmetric, as torch's Conv2d(padding=...)
  config: InceptionConfig = InceptionConfig()

  def setup(self):
    c = self.config
    (ph, pw), s = self.padding, self.stride
    self.conv = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)),
                        use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                        precision=c.precision)
    self.bn = BatchNorm(c.bn_eps, c.param_dtype)

  def __call__(self, x):
    return nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
  # TensorFlow's average pool leaves the padding out of the count (torchvision's does not).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and (TF) average-pool branches."""
  pool_features: int
  config: InceptionConfig = InceptionConfig()

  def setup(self):
    conv = lambda *a, **kw: BasicConv2d(*a, config=self.config, **kw)
    self.branch1x1 = conv(64)
    self.branch5x5_1 = conv(48)
    self.branch5x5_2 = conv(64, (5, 5), padding=(2, 2))
    self.branch3x3dbl_1 = conv(64)
    self.branch3x3dbl_2 = conv(96, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3 = conv(96, (3, 3), padding=(1, 1))
    self.branch_pool = conv(self.pool_features)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    pool = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction: strided 3x3, strided double 3x3 and max-pool branches."""
  config: InceptionConfig = InceptionConfig()

  def setup(self):
    conv = lambda *a, **kw: BasicConv2d(*a, config=self.config, **kw)
    self.branch3x3 = conv(384, (3, 3), stride=2)
    self.branch3x3dbl_1 = conv(64)
    self.branch3x3dbl_2 = conv(96, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3 = conv(96, (3, 3), stride=2)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block: 1x1, factorised 7x7, double factorised 7x7 and (TF) average-pool branches."""
  channels_7x7: int
  config: InceptionConfig = InceptionConfig()

  def setup(self):
    conv = lambda *a, **kw: BasicConv2d(*a, config=self.config, **kw)
    c7, row, col = self.channels_7x7, dict(padding=(0, 3)), dict(padding=(3, 0))
    self.branch1x1 = conv(192)
    self.branch7x7_1 = conv(c7)
    self.branch7x7_2 = conv(c7, (1, 7), **row)
    self.branch7x7_3 = conv(192, (7, 1), **col)
    self.branch7x7dbl_1 = conv(c7)
    self.branch7x7dbl_2 = conv(c7, (7, 1), **col)
    self.branch7x7dbl_3 = conv(c7, (1, 7), **row)
    self.branch7x7dbl_4 = conv(c7, (7, 1), **col)
    self.branch7x7dbl_5 = conv(192, (1, 7), **row)
    self.branch_pool = conv(192)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = layer(d)
    pool = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction: 1x1 + strided 3x3, 1x1 + 7x7 + strided 3x3 and max-pool branches."""
  config: InceptionConfig = InceptionConfig()

  def setup(self):
    conv = lambda *a, **kw: BasicConv2d(*a, config=self.config, **kw)
    self.branch3x3_1 = conv(192)
    self.branch3x3_2 = conv(320, (3, 3), stride=2)
    self.branch7x7x3_1 = conv(192)
    self.branch7x7x3_2 = conv(192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, (3, 3), stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 branches; `pool` is 'avg' (TF's, E_1) or 'max' (E_2)."""
  pool: str
  config: InceptionConfig = InceptionConfig()

  def setup(self):
    conv = lambda *a, **kw: BasicConv2d(*a, config=self.config, **kw)
    row, col = dict(padding=(0, 1)), dict(padding=(1, 0))
    self.branch1x1 = conv(320)
    self.branch3x3_1 = conv(384)
    self.branch3x3_2a = conv(384, (1, 3), **row)
    self.branch3x3_2b = conv(384, (3, 1), **col)
    self.branch3x3dbl_1 = conv(448)
    self.branch3x3dbl_2 = conv(384, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3a = conv(384, (1, 3), **row)
    self.branch3x3dbl_3b = conv(384, (3, 1), **col)
    self.branch_pool = conv(192)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    else:  # the TF graph's last block max-pools here (an oddity of that graph, kept for FID)
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3.

  `apply({'params': p}, x, outputs='2048')`: `x` is (B, H, W, 3) NHWC, already resized (299x299
  for the published numbers; any size >= 75 runs) and scaled to [-1, 1] as `(pixels - 128) /
  128`; the resize and scaling are the caller's (`ldm_jax.evaluation.fid.preprocess`), so that
  each reference's own resize can be chosen. `outputs` names one output, returned as an array,
  or a tuple of names, returned as a tuple in that order (torch-fidelity's feature names):
  '2048' the (B, 2048) pool_3 features of the FID; '64', '192', '768' the spatial means after
  the first and second max pool and after Mixed_6e (pytorch-fid's `--dims`); 'logits' the
  (B, 1008) classifier logits. All in float32; the network stops after the deepest one asked.

  Submodule names are the PyTorch state dict's (`Mixed_6b/branch7x7_2/conv/kernel` is
  `Mixed_6b.branch7x7_2.conv.weight`; batch norm `scale/bias/mean/var` are `weight/bias/
  running_mean/running_var`).
  """
  config: InceptionConfig = InceptionConfig()

  def setup(self):
    c = self.config
    conv = lambda *a, **kw: BasicConv2d(*a, config=c, **kw)
    self.Conv2d_1a_3x3 = conv(32, (3, 3), stride=2)
    self.Conv2d_2a_3x3 = conv(32, (3, 3))
    self.Conv2d_2b_3x3 = conv(64, (3, 3), padding=(1, 1))
    self.Conv2d_3b_1x1 = conv(80)
    self.Conv2d_4a_3x3 = conv(192, (3, 3))
    self.Mixed_5b = InceptionA(32, config=c)
    self.Mixed_5c = InceptionA(64, config=c)
    self.Mixed_5d = InceptionA(64, config=c)
    self.Mixed_6a = InceptionB(config=c)
    self.Mixed_6b = InceptionC(128, config=c)
    self.Mixed_6c = InceptionC(160, config=c)
    self.Mixed_6d = InceptionC(160, config=c)
    self.Mixed_6e = InceptionC(192, config=c)
    self.Mixed_7a = InceptionD(config=c)
    self.Mixed_7b = InceptionE('avg', config=c)
    self.Mixed_7c = InceptionE('max', config=c)
    self.fc = nn.Dense(c.num_classes, dtype=c.dtype, param_dtype=c.param_dtype,
                       precision=c.precision)

  def _stages(self):
    """(output name, layers up to it) in network order."""
    return (
        ('64', (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3,
                _max_pool_3x3_s2)),  # (B, 73, 73, 64)
        ('192', (self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, _max_pool_3x3_s2)),  # (B, 35, 35, 192)
        ('768', (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,  # (B, 35, 35, 288)
                 self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d,
                 self.Mixed_6e)),  # (B, 17, 17, 768)
        ('2048', (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)),  # (B, 8, 8, 2048)
    )

  def __call__(self, x, outputs='2048'):
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown or not names:
      raise ValueError(f'outputs={outputs!r}: each must be one of {OUTPUTS}')
    last = max(OUTPUTS.index(n) for n in names)
    x, found = x.astype(self.config.dtype), {}  # (B, 299, 299, 3)
    for name, layers in self._stages()[:min(last, 3) + 1]:
      for layer in layers:
        x = layer(x)
      # The spatial mean in float32: 64+ bf16 summands would lose the features' low bits.
      found[name] = x.astype(jnp.float32).mean(axis=(1, 2))
    if 'logits' in names:
      found['logits'] = self.fc(found['2048'].astype(self.config.dtype)).astype(jnp.float32)
    return found[outputs] if isinstance(outputs, str) else tuple(found[n] for n in names)


def example_input(batch=1, size=INPUT_SIZE):
  return jnp.zeros((batch, size, size, 3), jnp.float32)


def abstract_params(module):
  """The parameter tree as `jax.ShapeDtypeStruct`s (nothing is allocated or compiled)."""
  init = lambda: module.init(jax.random.key(0), example_input(), outputs='logits')
  return jax.eval_shape(init)['params']
