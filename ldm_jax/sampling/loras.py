"""LoRAs at sampling time: `--lora FILE[:SCALE]`, merged into a model's weights on the host.

Every LoRA file diffusers, kohya's scripts and ldm_jax write (`convert.lora.load_lora`) is fused
into the U-Net and text encoder(s) (SDXL's text_encoder_2 included) as
`W + sum_i scale_i * alpha_i / r_i * A_i @ B_i`, computed in float32 on the CPU and cast back to
each kernel's dtype. The merged trees keep the base trees' structure, shapes and dtypes, so
`place` puts them into a built `StableDiffusion` without recompiling its functions: sampling the
same LoRAs at other scales costs one host merge each. The base Components stay untouched.
"""

import contextlib
import dataclasses
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import lora as convert_lora
from ldm_jax.models import lora as lora_lib

NETWORKS = convert_lora.NETWORKS  # 'unet', 'text_encoder', 'text_encoder_2'
_WHAT = {'unet': 'U-Net', 'text_encoder': 'text encoder', 'text_encoder_2': 'text encoder 2'}


@dataclasses.dataclass(frozen=True)
class Lora:
  """One LoRA of a sampling run: its file (or folder) and its strength."""
  path: str
  scale: float = 1.0

  def record(self):
    """What samples.jsonl says of it."""
    return {'path': self.path, 'scale': self.scale}


def parse(spec):
  """A `--lora` value, FILE or FILE:SCALE (the scale after the last ':'), as a Lora.

  Raises:
    ValueError: a scale that is no finite number.
  """
  if isinstance(spec, Lora):
    return spec
  if isinstance(spec, (tuple, list)):
    return Lora(str(spec[0]), _scale(spec[1], spec))
  path, colon, tail = spec.rpartition(':')
  if not colon or (os.path.exists(spec) and not _is_number(tail)):
    return Lora(spec)
  if not path:
    raise ValueError(f'--lora {spec!r} names no file: give FILE or FILE:SCALE, e.g. '
                     'style.safetensors:0.8')
  return Lora(path, _scale(tail, spec))


def _is_number(text):
  try:
    float(text)
  except ValueError:
    return False
  return True


def _scale(value, spec):
  try:
    scale = float(value)
  except (TypeError, ValueError):
    scale = None
  if scale is None or not math.isfinite(scale):
    raise ValueError(f'--lora {spec!r}: the scale {value!r} is no finite number; give FILE or '
                     'FILE:SCALE, e.g. style.safetensors:0.8 (1.0 when left out; negative '
                     'values subtract the LoRA)')
  return scale


def parse_all(specs):
  """The Loras of repeated `--lora` values, in order (see `parse`)."""
  return tuple(parse(s) for s in specs or ())


def problems(loras):
  """What is wrong with the Loras before any weights load: files that do not exist."""
  return [f'--lora {lora.path!r} does not exist: give a LoRA .safetensors file (or a folder '
          'holding pytorch_lora_weights.safetensors)' for lora in map(parse, loras)
          if not os.path.exists(lora.path)]


def base_trees(components):
  """{network: params} of the networks a LoRA may adapt that these Components have."""
  return {n: getattr(components, n)[1] for n in NETWORKS if getattr(components, n) is not None}


def load(components, loras):
  """Reads the LoRA files onto the networks of `components`.

  Args:
    components: `convert.Components` (only the networks' shapes are used).
    loras: Loras, `(path, scale)` pairs or `--lora` strings.

  Returns:
    [(Lora, convert.lora.LoraFile)], in order.

  Raises:
    convert.lora.LoraFormatError (a ValueError): a file that does not fit this model, listing
      every module it names that the model lacks or that has another shape, and the model the
      file looks made for.
  """
  base = base_trees(components)
  return [(lora, convert_lora.load_lora(lora.path, base)) for lora in map(parse, loras)]


def apply_loras(components, loras, log=logging.info):
  """The Components with the LoRAs merged into the U-Net and text encoder(s).

  Args:
    components: `convert.Components` (untouched).
    loras: Loras, `(path, scale)` pairs, `--lora` strings, or `load`'s (Lora, LoraFile) pairs
      (to merge the same files at other scales without reading them again: use
      `dataclasses.replace(lora, scale=...)` on the Lora).
    log: where one line per LoRA goes (None: nowhere).

  Returns:
    Components whose adapted kernels are `lora.apply` of the base in float32, cast to the base
    kernel's dtype; every other leaf is the base's own array.
  """
  if not loras:
    return components
  loaded = [(parse(e[0]), e[1]) if _is_loaded(e) else load(components, [e])[0] for e in loras]
  for lora, file in loaded:
    if log:
      log(describe(lora, file))
  merged = {}
  for network, params in base_trees(components).items():
    entries = [file.entry(network, lora.scale) for lora, file in loaded
               if lora_lib.modules(file.adapters.get(network, {}))]
    if entries:
      merged[network] = (getattr(components, network)[0], merge(params, entries))
  return components.replace(**merged)


def _is_loaded(entry):
  return isinstance(entry, tuple) and len(entry) == 2 and isinstance(
      entry[1], convert_lora.LoraFile)


def merge(params, entries):
  """`lora.apply(params, entries)` in float32 on the CPU, each adapted kernel cast back to its
  base dtype; unadapted leaves are shared with `params`, not copied.

  On the CPU and at 'highest' precision, because an accelerator may run float32 matmuls in
  lower precision (TF32): the merge is done once per LoRA and scale, and exactly.
  """
  paths = {p for adapters, _, _ in entries for p in lora_lib.modules(adapters)}
  kernels = {p + ('kernel',) for p in paths}
  host = jax.tree_util.tree_map_with_path(
      lambda keys, x: np.asarray(x) if _key_path(keys) in kernels else x, params)
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.default_matmul_precision('highest'))
    cpu = _cpu()
    if cpu is not None:
      stack.enter_context(jax.default_device(cpu))
    out = lora_lib.apply(host, entries, dtype=jnp.float32)
  return jax.tree_util.tree_map_with_path(
      lambda keys, new, old: new.astype(old.dtype) if _key_path(keys) in kernels else old,
      out, params)


def _cpu():
  """The first CPU device, or None where JAX runs without its CPU backend (JAX_PLATFORMS)."""
  try:
    return jax.devices('cpu')[0]
  except RuntimeError:
    return None


def _key_path(keys):
  return tuple(k.key for k in keys)


def describe(lora, file):
  """One line: the file, its layout, the modules it adapts per network, ranks and the scale."""
  parts = []
  for network, adapters in file.adapters.items():
    mods = lora_lib.modules(adapters)
    if mods:
      ranks = sorted({lora_lib.rank_of(a) for a in mods.values()})
      parts.append(f'{len(mods)} {_WHAT[network]} modules (rank {"/".join(map(str, ranks))})')
  return (f'LoRA {lora.path} ({file.layout} layout): {", ".join(parts)}, at scale {lora.scale:g}')


def place(sd, components):
  """Puts the weights of `components` (same shapes and dtypes as `sd`'s) into the pipeline `sd`:
  its compiled functions are kept."""
  text = components.text_encoder and components.text_encoder[1]
  text_2 = components.text_encoder_2 and components.text_encoder_2[1]
  sd.set_weights(components.unet[1], components.vae[1], text, text_2)


def set_loras(sd, components, loras, log=logging.info):
  """Samples `sd` with `loras` from now on (none: the base again), merged into the base weights of
  `components` (the ones `sd` was built from); returns the merged Components."""
  merged = apply_loras(components, loras, log)
  place(sd, merged)
  return merged
