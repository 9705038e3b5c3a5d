"""The CLIP text encoder: transformers' CLIPTextModel[WithProjection]: CLIP-L, OpenCLIP-H, -bigG."""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import attention
from ldm_jax.models import config_io
from ldm_jax.models import layers

_IGNORED = ('architectures', 'model_type', 'transformers_version', 'torch_dtype', 'dtype',
            'initializer_range', 'initializer_factor', 'attention_dropout', 'dropout',
            'pad_token_id', 'bos_token_id', 'output_attentions', 'output_hidden_states',
            'return_dict', 'use_return_dict', 'id2label', 'label2id', 'is_decoder')


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """The text transformer (transformers' CLIPTextConfig names) plus runtime options."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  # Pooling: 2 is the legacy value in the SD configs, meaning "pool at argmax(input_ids)" (the
  # highest id is EOS in the CLIP vocabulary); any other value pools at the first EOS token.
  eos_token_id: int = 2
  projection_dim: int = 768
  with_projection: bool = False  # CLIPTextModelWithProjection: adds text_projection
  # Runtime options (not in config.json).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'auto'  # see attention.dot_product_attention
  remat: Any = 'none'  # per encoder layer: layers.REMAT_POLICIES (or a bool)

  def __post_init__(self):
    object.__setattr__(self, 'remat', layers.remat_policy(self.remat))
    layers.activation(self.hidden_act)  # fails early on an unknown activation
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'{self.num_attention_heads} heads')

  @classmethod
  def sd15(cls, **kw):
    """OpenAI CLIP ViT-L/14's text tower: 123.06M parameters."""
    return cls(**kw)

  clip_l = sd15

  @classmethod
  def openclip_h(cls, **kw):
    """OpenCLIP ViT-H/14's text tower as SD 2.x uses it: 23 of 24 layers (the penultimate)."""
    kw = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
              num_attention_heads=16, hidden_act='gelu', projection_dim=512) | kw
    return cls(**kw)

  sd21 = openclip_h

  @classmethod
  def openclip_bigg(cls, **kw):
    """OpenCLIP ViT-bigG/14's text tower, SDXL's second encoder (CLIPTextModelWithProjection):
    all 32 layers, 1280 wide; SDXL uses hidden_states[-2] and the projected `text_embeds`."""
    kw = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, hidden_act='gelu', projection_dim=1280,
              with_projection=True) | kw
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw):
    """32 wide, 2 layers: for tests (SDXL's tiny second encoder adds with_projection=True)."""
    kw = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, projection_dim=32) | kw
    return cls(**kw)

  @classmethod
  def from_transformers(cls, raw, **overrides):
    """From a transformers `text_encoder/config.json` dict."""
    raw = dict(raw)
    with_projection = 'CLIPTextModelWithProjection' in (raw.get('architectures') or [])
    if raw.get('model_type') == 'clip':  # a full CLIPModel config: use its text part
      raw = dict(raw.get('text_config', {}))
    return config_io.config_from_dict(cls, raw, ignored=_IGNORED, **(
        {'with_projection': with_projection} | overrides))

  def to_transformers(self):
    out = config_io.config_to_dict(self)
    del out['with_projection']
    arch = 'CLIPTextModelWithProjection' if self.with_projection else 'CLIPTextModel'
    out.update(architectures=[arch], model_type='clip_text_model', bos_token_id=0,
               pad_token_id=1, torch_dtype='float32')
    return out


@flax.struct.dataclass
class TextEncoderOutput:
  last_hidden_state: Any  # (B, L, D) after the final LayerNorm: what the SD U-Net consumes
  pooler_output: Any  # (B, D) at the EOS token
  hidden_states: tuple  # embeddings, then each layer's output (before the final LayerNorm)
  text_embeds: Any = None  # (B, projection_dim) with `with_projection`


class CLIPAttention(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    split = lambda t: t.reshape(t.shape[:2] + (heads, d))
    q, k, v = (split(layers.dense(c.hidden_size, name=n, **kw)(x))
               for n in ('q_proj', 'k_proj', 'v_proj'))
    out = attention.dot_product_attention(q, k, v, impl=c.attention_impl, mask=mask)
    return layers.dense(c.hidden_size, name='out_proj', **kw)(out.reshape(x.shape))


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    x = x + CLIPAttention(c, name='self_attn')(
        layers.LayerNorm(c.layer_norm_eps, c.param_dtype, name='layer_norm1')(x), mask)
    h = layers.LayerNorm(c.layer_norm_eps, c.param_dtype, name='layer_norm2')(x)
    return x + CLIPMLP(c, name='mlp')(h)


class CLIPMLP(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    x = layers.activation(c.hidden_act)(layers.dense(c.intermediate_size, name='fc1', **kw)(x))
    return layers.dense(c.hidden_size, name='fc2', **kw)(x)


class CLIPTextModel(nn.Module):
  """The text encoder.

  `apply({'params': p}, input_ids, attention_mask=None) -> TextEncoderOutput`:
    input_ids: (B, L) int token ids, L <= max_position_embeddings (77 for SD).
    attention_mask: optional (B, L) 1/0 padding mask (SD pipelines pass none).
  SD 1.x uses `last_hidden_state`; clip-skip k uses `final_layer_norm` of hidden_states[-(k+1)]
  (see `final_layer_norm`).
  """
  config: TextEncoderConfig

  def setup(self):
    c = self.config
    self.embeddings = Embeddings(c)
    self.encoder = Encoder(c)
    self.final_layer_norm = layers.LayerNorm(c.layer_norm_eps, c.param_dtype)
    if c.with_projection:
      self.text_projection = layers.dense(c.projection_dim, use_bias=False, dtype=c.dtype,
                                          param_dtype=c.param_dtype)

  def __call__(self, input_ids, attention_mask=None):
    c = self.config
    b, length = input_ids.shape
    if length > c.max_position_embeddings:
      raise ValueError(f'input_ids has {length} tokens; this text encoder takes at most '
                       f'{c.max_position_embeddings}: truncate when tokenizing')
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # causal
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    hidden_states = self.encoder(self.embeddings(input_ids), mask)
    last = self.final_layer_norm(hidden_states[-1])
    if c.eos_token_id == 2:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    pooled = last[jnp.arange(b), eos]
    text_embeds = self.text_projection(pooled) if c.with_projection else None
    return TextEncoderOutput(last, pooled, hidden_states, text_embeds)


class Embeddings(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    tok = nn.Embed(c.vocab_size, c.hidden_size, param_dtype=c.param_dtype, dtype=c.dtype,
                   name='token_embedding')(input_ids)
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, param_dtype=c.param_dtype,
                   dtype=c.dtype, name='position_embedding')(jnp.arange(input_ids.shape[1]))
    return tok + pos[None]


class Encoder(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    layer_cls = layers.maybe_remat(EncoderLayer, c.remat)
    states = [x]
    for i in range(c.num_hidden_layers):
      x = layer_cls(c, name=f'layers_{i}')(x, mask)
      states.append(x)
    return tuple(states)
