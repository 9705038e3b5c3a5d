"""Where the networks' weights come from: a diffusers folder, another run's EMA parameters, a
VAE run's export; and reading a training run back (its config, tokenizer) without writing to it.

Training (`train.stages`) and sampling (`sampling.sources`) both come here, so a run samples
with exactly the networks it trained with. Nothing here imports training or sampling code.
"""

import dataclasses
import json
import logging
import os
import tempfile

import jax.numpy as jnp
import ml_collections

from ldm_jax import checkpoint
from ldm_jax import convert
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import shapes as shapes_lib
from ldm_jax.models import build
from ldm_jax.models import vae as vae_lib
from ldm_jax.tokenizer import build as tokenizer_build


def run_config(workdir):
  """The ConfigDict a workdir was trained with (saved in every checkpoint)."""
  _, raw = checkpoint.read_checkpoint(workdir, item='config')
  return ml_collections.ConfigDict(raw)


def run_ema_params(workdir, name=None):
  """The EMA parameters of a run's latest checkpoint (of network `name` alone, if given).

  Only the EMA tree is restored: the optimizer's moments and the raw weights are never read.
  """
  step, ema = checkpoint.read_checkpoint(workdir, only='ema_params')
  logging.info('%s: EMA parameters of step %d of %s', name or 'all networks', step, workdir)
  return ema if name is None else ema[name]


def run_vae(workdir, vae):
  """The VAE module of a vae-stage run: its exported config (with the measured scaling factor)."""
  path = os.path.join(workdir, 'export', 'vae', 'config.json')
  if not os.path.isfile(path):
    logging.warning('%s has no exported VAE config (the run has not finished): using '
                    'model.vae and its scaling_factor %.5f', workdir, vae.config.scaling_factor)
    return vae
  with open(path) as f:
    exported = vae_lib.VAEConfig.from_diffusers(
        json.load(f), dtype=vae.config.dtype, param_dtype=vae.config.param_dtype,
        attention_impl=vae.config.attention_impl)
  logging.info('VAE of %s: scaling factor %.5f', workdir, exported.scaling_factor)
  return vae_lib.AutoencoderKL(exported)


def load_init(config):
  """The diffusers folder `config.init` as Components, in the config's dtypes."""
  return convert.load_diffusers(config.init, dtype=jnp.dtype(config.model.dtype),
                                param_dtype=jnp.dtype(config.model.param_dtype))


def scheduler_config(diffusion):
  """The diffusers scheduler_config.json our models ship with (SD's conventions)."""
  return {'_class_name': 'DDIMScheduler', 'num_train_timesteps': diffusion.num_train_timesteps,
          'beta_start': diffusion.beta_start, 'beta_end': diffusion.beta_end,
          'beta_schedule': diffusion.beta_schedule, 'prediction_type': diffusion.prediction_type,
          'rescale_betas_zero_snr': diffusion.rescale_betas_zero_snr, 'steps_offset': 1,
          'clip_sample': False, 'set_alpha_to_one': False, 'timestep_spacing': 'leading'}


@dataclasses.dataclass
class LDMWeights:
  """The ldm stage's networks and the weights a config names for them.

  Attributes:
    unet, vae, text_encoder: the Linen modules (a diffusers folder's own when `config.init`).
    scheduler_config: the diffusers scheduler config (the folder's, else from `config.diffusion`).
    frozen: {'vae': params, 'text_encoder': params when the text encoder is frozen}.
    pretrained: the trainable networks' parameters from `config.init`, or None (from scratch).
  """
  unet: object
  vae: object
  text_encoder: object
  scheduler_config: dict
  frozen: dict
  pretrained: dict | None


def ldm_weights(config, train_text):
  """The networks of an ldm-stage config and their fixed and pretrained weights.

  Sources, in order: `config.init` (a diffusers folder: every network), else the model config
  with the VAE of `config.vae_workdir` (a vae-stage run) and, for a frozen text encoder, the
  one of `config.text_encoder.workdir` (a clip-stage run).
  """
  nets = build.networks_from_config(config.model)
  if config.init:  # fine-tuning: the networks are the folder's, as they were trained
    init = load_init(config)
    frozen = {'vae': init.vae[1]}
    if not config.get('init_unet', True):  # a new U-Net of the folder's layout, the config's noise
      if train_text:
        raise ValueError('init_unet=False trains a new U-Net over the init folder\'s frozen VAE '
                         'and text encoder: set --config.text_encoder.trainable=False')
      frozen['text_encoder'] = init.text_encoder[1]
      return LDMWeights(init.unet[0], init.vae[0], init.text_encoder[0],
                        scheduler_config(config.diffusion), frozen, None)
    pretrained = {'unet': init.unet[1]}
    (pretrained if train_text else frozen)['text_encoder'] = init.text_encoder[1]
    return LDMWeights(init.unet[0], init.vae[0], init.text_encoder[0],
                      dict(init.scheduler_config), frozen, pretrained)
  vae = nets['vae']
  if config.vae_workdir:
    vae = run_vae(config.vae_workdir, vae)
    frozen = {'vae': run_ema_params(config.vae_workdir, 'vae')}
  elif config.allow_random_vae:
    logging.warning('ldm stage with a RANDOM frozen VAE (allow_random_vae): smoke runs only')
    frozen = {'vae': build.random_params(vae, 0)}
  else:
    raise ValueError('the ldm stage needs a trained VAE: set --config.vae_workdir=<a vae-stage '
                     'workdir> or --config.init=<a diffusers folder>')
  if not train_text:
    if not config.text_encoder.workdir:
      raise ValueError('a frozen text encoder needs weights: --config.init=<diffusers folder> or '
                       '--config.text_encoder.workdir=<a clip-stage workdir>, or train it '
                       'jointly with --config.text_encoder.trainable=True')
    params = dict(run_ema_params(config.text_encoder.workdir, 'text_encoder'))
    params.pop('text_projection', None)  # the clip stage's; the U-Net uses the states
    frozen['text_encoder'] = params
  return LDMWeights(nets['unet'], vae, nets['text_encoder'], scheduler_config(config.diffusion),
                    frozen, None)


def tokenizer(config, save_to=None):
  """The tokenizer named by `config.tokenizer` ('shapes', a folder, or '' for config.init's).

  Args:
    config: an experiment config.
    save_to: a folder to keep a copy in (a training run's `<workdir>/tokenizer`, written by
      process 0 only: other hosts may share the workdir); None writes nowhere but a temp folder.
  """
  if config.tokenizer == 'shapes':  # a word-level BPE over the shapes captions
    folder = save_to or os.path.join(tempfile.mkdtemp(), 'tokenizer')
    if not os.path.isdir(folder):
      tokenizer_build.build_caption_tokenizer([' '.join(shapes_lib.caption_words())], folder)
    return tokenizer_lib.load_tokenizer(folder)
  source = config.tokenizer or (os.path.join(config.init, 'tokenizer') if config.init else '')
  if not source:
    raise ValueError("config.tokenizer is empty and there is no config.init to take one from: "
                     "set it to a tokenizer folder (python -m ldm_jax.tokenizer build-clip) or 'shapes'")
  tok = tokenizer_lib.load_tokenizer(source)
  if save_to and not os.path.isdir(save_to):
    tok.save_pretrained(save_to)
  return tok


def fill_vocab_size(config, tok):
  """Sets `model.text_encoder.vocab_size` to the tokenizer's size where the config says 0 (as
  many as the tokenizer has)."""
  if not dict(config.model.text_encoder).get('vocab_size', 1):
    with config.unlocked():
      config.model.text_encoder.vocab_size = len(tok)


def run_tokenizer(workdir, config):
  """A training run's tokenizer: the copy it kept in `<workdir>/tokenizer`, else the one its
  config names. Reads only: the workdir is left as it is."""
  folder = os.path.join(workdir, 'tokenizer')
  if os.path.isdir(folder):
    return tokenizer_lib.load_tokenizer(folder)
  return tokenizer(config)
