"""The Stage protocol: what every training stage says about itself, with the defaults."""

import jax
import jax.numpy as jnp


class Stage:
  """A training stage: what trains, what is frozen, its loss, its previews and its export.

  The loop knows stages only through this interface and never asks for a stage's name.

  Attributes:
    name: the value of `config.stage` that selects it.
    frozen: fixed weights (a host tree; {} when none), passed to the step undonated.
    pretrained: the trainable tree loaded from `config.init`, or None to start from
      `init_params` (random).
  """
  name = ''
  samples = False  # whether `sample` makes images (in-training evaluation needs it)

  def __init__(self, config):
    self.config = config
    self.frozen = {}
    self.pretrained = None

  def init_params(self, rng):
    """The trainable tree from scratch (traced under jit: nothing is allocated on the host)."""
    raise NotImplementedError

  def loss(self, params, frozen, batch, keys, step):
    """(scalar loss, dict of scalar metrics), a mean over the batch; one PRNG key per example."""
    raise NotImplementedError

  def training_data(self, data_config, workdir):
    """The LoaderConfig to train from: `data_config`, or data the stage encodes first."""
    del workdir
    if self.config.precompute_latents:
      raise ValueError(f'precompute_latents is for the ldm stage, not {self.name!r}: set '
                       '--config.precompute_latents=False')
    return data_config

  def preview(self, ema_params, frozen, images, mesh):
    """A uint8 (H, W, 3) grid showing what the stage has learnt, or None (nothing to show).

    Args:
      ema_params, frozen: host trees of the EMA and the frozen weights.
      images: a few training images (float32 NHWC in [-1, 1]), or None.
      mesh: the mesh to sample on (this process's devices).
    """
    del ema_params, frozen, images, mesh
    return None

  def sample(self, ema_params, frozen, prompts, mesh, settings):
    """uint8 (N, H, W, 3) images of `prompts` from the EMA weights (stages with `samples`).

    Args:
      ema_params, frozen: host trees of the EMA and the frozen weights.
      prompts: N strings.
      mesh: the mesh to sample on (this process's devices).
      settings: the config's `eval` group (batch_size, steps, sampler, guidance, seed).
    """
    raise NotImplementedError(f'the {self.name} stage does not sample images')

  def export(self, ema_params, frozen, path, loader):
    """Writes the trained networks to `path` in a format others load (nothing by default)."""
    del ema_params, frozen, path, loader


def split_keys(keys, n):
  """n independent per-example key arrays from one (one key per example in, n arrays out)."""
  return [jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(n)]


def normal(keys, shape):
  """Per-example standard normal noise of `shape`, one example per key."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
