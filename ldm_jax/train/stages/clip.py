"""The clip stage: contrastive image-text pretraining of the text encoder with a small ViT."""

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax.models import build
from ldm_jax.models import image_encoder
from ldm_jax.models import text_encoder as text_encoder_lib
from ldm_jax.train import losses
from ldm_jax.train.stages import base


class CLIPStage(base.Stage):
  """Contrastive image-text pretraining of the text encoder with a small ViT image tower."""
  name = 'clip'

  def __init__(self, config, tokenizer=None):
    del tokenizer
    super().__init__(config)
    te = build.networks_from_config(config.model)['text_encoder']
    self.text_encoder = text_encoder_lib.CLIPTextModel(
        dataclasses.replace(te.config, with_projection=True,
                            projection_dim=config.clip.projection_dim))
    # The tower is CLIP's (transformers' layout), pooled as config.clip.pooling says.
    image_config = getattr(image_encoder.VisionConfig, config.clip.image_preset)(
        image_size=config.data.resolution, projection_dim=config.clip.projection_dim,
        pooling=config.clip.pooling)
    self.image_encoder = image_encoder.CLIPVisionModel(image_config)

  def init_params(self, rng):
    k_text, k_image = jax.random.split(rng)
    inputs = image_encoder.example_inputs(self.image_encoder.config)
    return {'text_encoder': build.init_params(self.text_encoder, k_text),
            'image_encoder': self.image_encoder.init(k_image, *inputs)['params'],
            'logit_scale': jnp.asarray(losses.CLIP_INIT_LOGIT_SCALE, jnp.float32)}

  def loss(self, params, frozen, batch, keys, step):
    del frozen, keys, step
    image = self.image_encoder.apply({'params': params['image_encoder']}, batch['image'])
    text = self.text_encoder.apply({'params': params['text_encoder']}, batch['input_ids'])
    return losses.clip_contrastive(image.image_embeds, text.text_embeds, params['logit_scale'])
