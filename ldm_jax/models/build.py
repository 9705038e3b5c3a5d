"""Example inputs, abstract parameter trees and initialisation for the three networks."""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import text_encoder
from ldm_jax.models import unet
from ldm_jax.models import vae


def example_inputs(module, batch=1):
  """The smallest inputs that trace `module` (parameters do not depend on their sizes)."""
  c = module.config
  if isinstance(module, unet.UNet2DConditionModel):
    side = 2 ** (len(c.block_out_channels) - 1)
    return (jnp.zeros((batch, side, side, c.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, 1, c.cross_attention_dim)))
  if isinstance(module, vae.AutoencoderKL):
    side = c.downsample_factor
    return (jnp.zeros((batch, side, side, c.in_channels)),)
  if isinstance(module, text_encoder.CLIPTextModel):
    return (jnp.zeros((batch, c.max_position_embeddings), jnp.int32),)
  raise TypeError(f'not an ldm_jax network: {type(module).__name__}')


def abstract_params(module):
  """The parameter tree as `jax.ShapeDtypeStruct`s, via `jax.eval_shape` (nothing is allocated)."""
  return jax.eval_shape(lambda: init_params(module, jax.random.key(0)))


def init_params(module, key):
  """Randomly initialised parameters (Flax's default initialisers)."""
  return module.init(key, *example_inputs(module))['params']


def count_params(params):
  """Total number of parameters in a (possibly abstract) tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
