"""Example inputs, abstract parameter trees and initialisation for the three networks."""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import image_encoder
from ldm_jax.models import text_encoder
from ldm_jax.models import unet
from ldm_jax.models import vae


PRESETS = ('sd15', 'sd21', 'tiny')


def networks_from_config(model_config):
  """The three modules named by a config's `model` group (preset, dtype, param_dtype, ...).

  Returns:
    {'unet': UNet2DConditionModel, 'vae': AutoencoderKL, 'text_encoder': CLIPTextModel}.
  """
  preset = model_config.preset
  if preset not in PRESETS:
    raise ValueError(f'model.preset={preset!r} is not one of {PRESETS}')
  runtime = dict(dtype=jnp.dtype(model_config.dtype), param_dtype=jnp.dtype(model_config.param_dtype),
                 attention_impl=model_config.attention_impl, remat=model_config.remat)
  te_preset = 'openclip_h' if preset == 'sd21' else preset
  # Per-network overrides of the preset (config.model.unet = {'block_out_channels': ...}).
  over = lambda name: {k: tuple(v) if isinstance(v, list) else v
                       for k, v in dict(model_config.get(name) or {}).items()}
  return {
      'unet': unet.UNet2DConditionModel(
          getattr(unet.UNetConfig, preset)(**(runtime | over('unet')))),
      'vae': vae.AutoencoderKL(getattr(vae.VAEConfig, preset)(**(runtime | over('vae')))),
      'text_encoder': text_encoder.CLIPTextModel(
          getattr(text_encoder.TextEncoderConfig, te_preset)(**(runtime | over('text_encoder')))),
  }


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
  if isinstance(module, image_encoder.CLIPVisionModel):
    return image_encoder.example_inputs(c, batch)
  raise TypeError(f'not an ldm_jax network: {type(module).__name__}')


def abstract_params(module):
  """The parameter tree as `jax.ShapeDtypeStruct`s, via `jax.eval_shape` (nothing is allocated)."""
  return jax.eval_shape(lambda: init_params(module, jax.random.key(0)))


def init_params(module, key):
  """Randomly initialised parameters (Flax's default initialisers)."""
  return module.init(key, *example_inputs(module))['params']


def random_params(module, seed=0):
  """Random parameters drawn on the host with numpy, for tests and benchmarks.

  Compiling `init_params` costs ~50 ms per random op on XLA:CPU (10 s for the tiny U-Net); this
  costs nothing to compile. Kernels are N(0, 1/fan_in), norm scales 1 + N(0, 0.02^2), biases and
  embeddings N(0, 0.02^2), so every leaf matters and activations keep their scale.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    x = rng.standard_normal(leaf.shape, dtype=np.float32)
    if name == 'kernel':
      x /= np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      x *= 0.02
      if name == 'scale':
        x += 1.0
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(module))


def count_params(params):
  """Total number of parameters in a (possibly abstract) tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
