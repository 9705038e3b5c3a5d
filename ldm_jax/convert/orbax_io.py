"""Components as an Orbax folder: one parameter tree per network plus the configs as JSON.

Layout of OUT:
  unet/, vae/, text_encoder/   Orbax StandardCheckpointer folders of the parameter trees (SDXL:
                               text_encoder_2/ too; the SDXL refiner has no text_encoder/)
  ldm_jax_orbax.json           {'unet', 'vae', 'text_encoder', 'scheduler'}: the diffusers /
                               transformers config dicts the networks are rebuilt from (SDXL:
                               'text_encoder_2' and 'options'; the refiner's text_encoder null)
  tokenizer/, tokenizer_2/     the tokenizers, when the components have them
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
NETWORKS = ('unet', 'vae', 'text_encoder', 'text_encoder_2')


def is_orbax_folder(path):
  return os.path.isfile(os.path.join(path, INDEX))


def save_orbax(components, path):
  """Writes the parameter trees with Orbax and their configs as JSON (see the module doc)."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  present = [n for n in NETWORKS if getattr(components, n) is not None]
  for name in present:
    checkpointer.save(os.path.join(path, name), getattr(components, name)[1], force=True)
  checkpointer.wait_until_finished()
  index = {'unet': components.unet[0].config.to_diffusers(),
           'vae': components.vae[0].config.to_diffusers(),
           'scheduler': dict(components.scheduler_config)}
  index |= {n: getattr(components, n)[0].config.to_transformers() if n in present else None
            for n in NETWORKS[2:]}
  if components.text_encoder_2 is None:
    del index['text_encoder_2']
  else:
    index['options'] = diffusers_lib.xl_options(components.options)
  config_io.write_json(index, os.path.join(path, INDEX))
  for name in ('tokenizer', 'tokenizer_2'):
    if getattr(components, name) is not None:
      getattr(components, name).save_pretrained(os.path.join(path, name))


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
  }
  for name in NETWORKS[2:]:
    if configs.get(name) is not None:
      modules[name] = text_encoder_lib.CLIPTextModel(
          text_encoder_lib.TextEncoderConfig.from_transformers(configs[name], **runtime))
  checkpointer = ocp.StandardCheckpointer()
  nets = {name: None for name in NETWORKS}
  for name, module in modules.items():
    abstract = build.abstract_params(module)
    params = checkpointer.restore(os.path.join(path, name), abstract)
    nets[name] = (module, jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), params, abstract))
  tokenizers = {}
  for name in ('tokenizer', 'tokenizer_2'):
    folder = os.path.join(path, name)
    tokenizers[name] = diffusers_lib.load_tokenizer(folder) if os.path.isdir(folder) else None
  return diffusers_lib.Components(scheduler_config=configs['scheduler'],
                                  options=configs.get('options') or {}, **tokenizers, **nets)
