"""Example inputs, abstract parameter trees and initialisation for the three networks."""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import image_encoder
from ldm_jax.models import text_encoder
from ldm_jax.models import unet
from ldm_jax.models import vae


PRESETS = ('sd15', 'sd21', 'tiny', 'sdxl', 'tiny_xl')
# Per preset: the U-Net, VAE, text encoder and (SDXL) second text encoder presets.
_NETWORK_PRESETS = {
    'sd15': ('sd15', 'sd15', 'sd15', None),
    'sd21': ('sd21', 'sd21', 'openclip_h', None),
    'tiny': ('tiny', 'tiny', 'tiny', None),
    'sdxl': ('sdxl', 'sdxl', 'clip_l', 'openclip_bigg'),
    'tiny_xl': ('tiny_xl', 'tiny', 'tiny', 'tiny'),
}


def networks_from_config(model_config):
  """The networks named by a config's `model` group (preset, dtype, param_dtype, ...).

  Per-network overrides of the preset come from `model_config.unet`, `.vae`, `.text_encoder`
  and `.text_encoder_2` (dicts of config fields).

  Returns:
    {'unet': UNet2DConditionModel, 'vae': AutoencoderKL, 'text_encoder': CLIPTextModel}, plus
    'text_encoder_2' (a CLIPTextModel with_projection, SDXL's OpenCLIP bigG) for the XL presets.

  Raises:
    ValueError: an unknown preset.
  """
  preset = model_config.preset
  if preset not in PRESETS:
    raise ValueError(f'model.preset={preset!r} is not one of {PRESETS}')
  runtime = dict(dtype=jnp.dtype(model_config.dtype), param_dtype=jnp.dtype(model_config.param_dtype),
                 attention_impl=model_config.attention_impl, remat=model_config.remat)
  unet_preset, vae_preset, te_preset, te2_preset = _NETWORK_PRESETS[preset]
  # Per-network overrides of the preset (config.model.unet = {'block_out_channels': ...}).
  over = lambda name: {k: tuple(v) if isinstance(v, list) else v
                       for k, v in dict(model_config.get(name) or {}).items()}
  te_cls = text_encoder.TextEncoderConfig
  networks = {
      'unet': unet.UNet2DConditionModel(
          getattr(unet.UNetConfig, unet_preset)(**(runtime | over('unet')))),
      'vae': vae.AutoencoderKL(getattr(vae.VAEConfig, vae_preset)(**(runtime | over('vae')))),
      'text_encoder': text_encoder.CLIPTextModel(
          getattr(te_cls, te_preset)(**(runtime | over('text_encoder')))),
  }
  if te2_preset is not None:
    networks['text_encoder_2'] = text_encoder.CLIPTextModel(getattr(te_cls, te2_preset)(
        **(runtime | {'with_projection': True} | over('text_encoder_2'))))
  return networks


def example_inputs(module, batch=1):
  """The smallest inputs that trace `module` (parameters do not depend on their sizes)."""
  c = module.config
  if isinstance(module, unet.UNet2DConditionModel):
    side = 2 ** (len(c.block_out_channels) - 1)
    inputs = (jnp.zeros((batch, side, side, c.in_channels)), jnp.zeros((batch,)),
              jnp.zeros((batch, 1, c.cross_attention_dim)))
    if c.is_xl:  # text_embeds of width P and time_ids of K with P + K * dim = input dim
      n_ids = 1
      width = c.projection_class_embeddings_input_dim - n_ids * c.addition_time_embed_dim
      inputs += ({'text_embeds': jnp.zeros((batch, width)),
                  'time_ids': jnp.zeros((batch, n_ids))},)
    return inputs
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
