"""Components as an Orbax folder: one parameter tree per network plus the configs as JSON.

Layout of OUT:
  unet/, vae/, text_encoder/   Orbax StandardCheckpointer folders of the parameter trees
  ldm_jax_orbax.json           {'unet', 'vae', 'text_encoder', 'scheduler'}: the diffusers /
                               transformers config dicts the networks are rebuilt from
  tokenizer/                   the tokenizer, when the components have one
"""

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.models import build
from ldm_jax.models import config_io
from ldm_jax.models import text_encoder as text_encoder_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.models import vae as vae_lib

INDEX = 'ldm_jax_orbax.json'
NETWORKS = ('unet', 'vae', 'text_encoder')


def is_orbax_folder(path):
  return os.path.isfile(os.path.join(path, INDEX))


def save_orbax(components, path):
  """Writes the three parameter trees with Orbax and their configs as JSON (see the module doc)."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  for name in NETWORKS:
    checkpointer.save(os.path.join(path, name), getattr(components, name)[1], force=True)
  checkpointer.wait_until_finished()
  (unet, _), (vae, _), (text, _) = components.unet, components.vae, components.text_encoder
  config_io.write_json({'unet': unet.config.to_diffusers(), 'vae': vae.config.to_diffusers(),
                        'text_encoder': text.config.to_transformers(),
                        'scheduler': dict(components.scheduler_config)},
                       os.path.join(path, INDEX))
  if components.tokenizer is not None:
    components.tokenizer.save_pretrained(os.path.join(path, 'tokenizer'))


def load_orbax(path, dtype=jnp.float32, param_dtype=None):
  """Reads a folder written by `save_orbax` back into Components."""
  path = os.path.abspath(path)
  if not is_orbax_folder(path):
    raise diffusers_lib.ConversionError(f'{path} is not an ldm_jax Orbax folder (no {INDEX})')
  configs = config_io.read_json(os.path.join(path, INDEX))
  runtime = dict(dtype=dtype, param_dtype=param_dtype or dtype)
  modules = {
      'unet': unet_lib.UNet2DConditionModel(
          unet_lib.UNetConfig.from_diffusers(configs['unet'], **runtime)),
      'vae': vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_diffusers(configs['vae'], **runtime)),
      'text_encoder': text_encoder_lib.CLIPTextModel(
          text_encoder_lib.TextEncoderConfig.from_transformers(configs['text_encoder'], **runtime)),
  }
  checkpointer = ocp.StandardCheckpointer()
  nets = {}
  for name, module in modules.items():
    abstract = build.abstract_params(module)
    params = checkpointer.restore(os.path.join(path, name), abstract)
    nets[name] = (module, jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), params, abstract))
  tokenizer_dir = os.path.join(path, 'tokenizer')
  tokenizer = diffusers_lib.load_tokenizer(tokenizer_dir) if os.path.isdir(tokenizer_dir) else None
  return diffusers_lib.Components(tokenizer=tokenizer, scheduler_config=configs['scheduler'],
                                  **nets)
