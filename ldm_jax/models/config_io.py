"""Reading and writing the networks' frozen config dataclasses as diffusers/transformers config.json dicts."""

import dataclasses
import json
import os

# Our own options: they live in the dataclass but never in a config.json.
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'attention_impl', 'remat')


def as_tuple(value, n):
  """An int (or 1-element list) broadcast to n entries, or a sequence checked to have n entries."""
  if isinstance(value, (list, tuple)):
    if len(value) == 1 and n != 1:
      value = list(value) * n
    if len(value) != n:
      raise ValueError(f'expected {n} values (one per block), got {list(value)}')
    return tuple(value)
  return (value,) * n


def config_from_dict(cls, raw, *, renames=None, unsupported=None, ignored=(), **overrides):
  """Builds the dataclass `cls` from a config.json dict.

  Args:
    cls: a frozen config dataclass.
    raw: the parsed config.json.
    renames: {json key: field name} for keys whose names differ.
    unsupported: {json key: the value(s) we support}; any other value is an error naming the key.
    ignored: keys that are accepted and dropped (metadata such as `_class_name`).
    **overrides: field values that win over the file (dtype, param_dtype, ...).

  Returns:
    An instance of `cls`.
  """
  renames = renames or {}
  unsupported = unsupported or {}
  fields = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
  kwargs, problems = {}, []
  for key, value in raw.items():
    name = renames.get(key, key)
    if key in unsupported:
      allowed = unsupported[key]
      allowed = allowed if isinstance(allowed, tuple) else (allowed,)
      if value not in allowed:
        problems.append(f'{key}={value!r} (ldm_jax supports {" or ".join(map(repr, allowed))})')
    elif name in fields:
      kwargs[name] = tuple(value) if isinstance(value, list) else value
    elif not (key.startswith('_') or key in ignored):
      problems.append(f'{key}={value!r} (unknown key)')
  if problems:
    raise ValueError(f'{cls.__name__}: config.json has settings this model cannot reproduce: '
                     + '; '.join(problems) + '. Use a Stable Diffusion 1.x, 2.x or XL config.')
  kwargs.update(overrides)
  return cls(**kwargs)


def config_to_dict(config, *, renames=None):
  """The dataclass as a config.json dict, without our runtime-only fields."""
  renames = renames or {}
  out = {}
  for f in dataclasses.fields(config):
    if f.name in RUNTIME_FIELDS:
      continue
    value = getattr(config, f.name)
    out[renames.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
  return out


def read_json(path):
  with open(path) as f:
    return json.load(f)


def write_json(obj, path):
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')

