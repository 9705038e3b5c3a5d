"""Encode a dataset once into VAE posterior moments and text-encoder states (as MLPerf does).

Training from the result skips the VAE encoder and the frozen text encoder in every step. The
output is an array_record tfds dataset read by the same loader with `precomputed=True`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data import pipeline


class PrecomputedConfig(tfds.core.BuilderConfig):

  def __init__(self, *, name, loader_config, vae, text_encoder, dtype, batch_size):
    super().__init__(name=name, version=tfds.core.Version('1.0.0'),
                     description=f'VAE moments and text states of {loader_config.name}')
    self.loader_config, self.vae, self.text_encoder = loader_config, vae, text_encoder
    self.dtype, self.batch_size = dtype, batch_size


class Precomputed(tfds.core.GeneratorBasedBuilder):
  """Per example: 'moments' (h, w, 2 * latent channels) and 'context' (L, D), plus the ids."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = []

  def _info(self):
    c = self.builder_config
    (vae, _), (te, _) = c.vae, c.text_encoder
    side = c.loader_config.resolution // vae.config.downsample_factor
    # disable_shuffling keeps the source's record order: record i encodes source record i.
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
        'moments': tfds.features.Tensor(shape=(side, side, 2 * vae.config.latent_channels),
                                        dtype=c.dtype),
        'context': tfds.features.Tensor(
            shape=(c.loader_config.max_length, te.config.hidden_size), dtype=c.dtype),
        'input_ids': tfds.features.Tensor(shape=(c.loader_config.max_length,), dtype=np.int32),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {self.builder_config.loader_config.split.split('[')[0]: self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    (vae, vae_params), (te, te_params) = c.vae, c.text_encoder
    encode = jax.jit(lambda p, x: jnp.concatenate(vae.apply({'params': p}, x, method='encode'), -1))
    embed = jax.jit(lambda p, ids: te.apply({'params': p}, ids).last_hidden_state)
    key = 0
    for batch in c.batches:
      moments = np.asarray(encode(vae_params, batch['image']), c.dtype)
      context = np.asarray(embed(te_params, batch['input_ids']), c.dtype)
      for m, ctx, ids in zip(moments, context, batch['input_ids']):
        yield key, {'moments': m, 'context': ctx, 'input_ids': ids}
        key += 1


def precompute(loader_config, tokenizer, vae, text_encoder, data_dir, name, batch_size=16,
               dtype=np.float32):
  """Encodes every record of `loader_config` once.

  Args:
    loader_config: what to encode (shuffle, flips and caption dropout are turned off: one pass,
      deterministic center crops).
    tokenizer: the text encoder's tokenizer.
    vae: (AutoencoderKL, params).
    text_encoder: (CLIPTextModel, params).
    data_dir: where to write the dataset.
    name: its config name; the result is read as 'precomputed/<name>'.
    batch_size: encoding batch (the last partial batch is encoded too).
    dtype: storage dtype of moments and context (np.float16 halves the size).

  Returns:
    (dataset name for `LoaderConfig.name`, loader stats of the encoding pass).
  """
  one_pass = dataclasses.replace(loader_config, shuffle=False, flip=False, caption_dropout=0.0,
                                 crop='center', num_epochs=1, batch_size=1, precomputed=False)
  config = PrecomputedConfig(name=name, loader_config=one_pass, vae=vae, text_encoder=text_encoder,
                             dtype=dtype, batch_size=batch_size)
  loader = pipeline.Loader(one_pass, tokenizer, process_index=0, process_count=1)
  config.batches = _rebatch(loader, batch_size)
  Precomputed(config=config, data_dir=data_dir, file_format='array_record').download_and_prepare()
  return f'precomputed/{name}', loader.stats


def _rebatch(loader, batch_size):
  """Groups the loader's single-example batches, keeping the last partial group."""
  group = []
  for batch in loader:
    group.append(batch)
    if len(group) == batch_size:
      yield {k: np.concatenate([b[k] for b in group]) for k in ('image', 'input_ids')}
      group = []
  if group:
    yield {k: np.concatenate([b[k] for b in group]) for k in ('image', 'input_ids')}
