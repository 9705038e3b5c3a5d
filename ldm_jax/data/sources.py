"""Random-access record sources: our builders' outputs or any locally prepared tfds dataset.

`data.name` schemes (all under `data.data_dir`):
  shapes/s{size}_n{train}_h{holdout}_seed{seed}[_centered]: the synthetic shapes dataset, built
    on demand when missing (one process) by `builders.build_shapes`.
  image_folder/<name>: `python -m ldm_jax.data build folder --src DIR` (name: DIR's name).
  precomputed/<name>: VAE encodings written by `ldm_jax.data.precompute`.
  webdataset:<pattern>: tar shards read in place (`webdataset.py`), e.g.
    webdataset:/data/laion/{00000..00127}.tar (brace ranges and lists, globs; relative patterns
    are under data_dir).
  parquet:<pattern>: parquet files of image bytes and captions read in place (`parquet.py`).
  anything else: a tfds dataset ('coco_captions', 'name/config') prepared in array_record format.
"""

import hashlib
import logging
import os
import re

from etils import epath
import tensorflow_datasets as tfds

from ldm_jax.data import shards
from ldm_jax.data import webdataset

SHAPES_NAME = re.compile(r'shapes/s(\d+)_n(\d+)_h(\d+)_seed(\d+)(?:_([a-z]+))?')
SHAPES_FORMAT = ('shapes/s{size}_n{train}_h{holdout}_seed{seed}[_centered], e.g. '
                 'shapes/s32_n2000_h200_seed0_centered')
_SCHEMES = (
    f'{SHAPES_FORMAT} (built on demand); image_folder/<name> (`python -m ldm_jax.data build '
    'folder --src DIR --data_dir DATA_DIR`, <name> being the folder\'s name); '
    'precomputed/<name> (written by ldm_jax.data.precompute); webdataset:<pattern> or '
    'parquet:<pattern> (shards read in place, e.g. webdataset:/data/laion/{00000..00127}.tar); '
    'or a tfds dataset prepared under data_dir in array_record format')


def data_source(name, split, data_dir, image_key='image', caption_key='caption'):
  """The split of a dataset as a random-access source (ArrayRecord or shards; no TensorFlow).

  A missing shapes dataset is built first (it is synthetic and deterministic) when this is the
  only process; with several, the error gives the command that builds it.

  Args:
    name: 'shapes/<config>' or 'image_folder/<config>' as the builders return it,
      'webdataset:<pattern>' or 'parquet:<pattern>' (shards read in place), or any tfds name
      ('coco_captions', 'name/config') prepared under `data_dir` in array_record format.
    split: a split name ('train', 'holdout', ...), or a tfds slice ('train[:90%]'); shards
      have one split, 'train' (every record of the shards).
    data_dir: the tfds data directory; relative shard patterns are under it.
    image_key: the record key of the image (the loader's `data.image_key`); a parquet source
      reads the column of that name.
    caption_key: the record key of the caption (`data.caption_key`), likewise.

  Returns:
    A sequence of records (dicts of numpy arrays / bytes).

  Raises:
    FileNotFoundError: the dataset is not there (the message says how to make it).
    ValueError: the split does not exist, or a shard is damaged or lacks the columns.
  """
  if shards.split_name(name):
    return _shard_source(name, split, data_dir, image_key, caption_key)
  version_dir = newest_version(name, data_dir)
  if version_dir is None and name.startswith('shapes/'):
    _build_shapes(name, data_dir)
    version_dir = newest_version(name, data_dir)
  if version_dir is not None:
    builder = tfds.builder_from_directory(version_dir)
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)  # a default config, a registered name
    except Exception as e:  # tfds raises several types for unknown names
      raise FileNotFoundError(_not_found(name, data_dir)) from e
    if not builder.is_prepared():
      raise FileNotFoundError(_not_found(name, data_dir))
  available = list(builder.info.splits.keys())
  if split.split('[')[0] not in available:
    raise ValueError(f'dataset {name!r} has no split {split!r}; it has {available}')
  return builder.as_data_source(split)


def check_name(name, data_dir, process_count=1, image_key='image', caption_key='caption'):
  """What is wrong with `data.name` / `data.data_dir`, without reading any records.

  Shards are matched (every file the pattern lists must exist); tar shards are checked for a
  truncated end, and the first parquet file's footer for the columns.

  Args:
    name: the config's `data.name`.
    data_dir: the config's `data.data_dir`.
    process_count: processes of the run (a missing shapes dataset is built on demand only by a
      single process).
    image_key: the config's `data.image_key` (the column a parquet source reads).
    caption_key: the config's `data.caption_key`.

  Returns:
    None when the dataset is there (or is a shapes dataset that will be built on demand), else
    one message naming the problem and the fix.
  """
  if not isinstance(name, str) or not name.strip('/'):
    return f'data.name is empty; it takes: {_SCHEMES}'
  if shards.split_name(name):
    return _shards_problem(name, data_dir, image_key, caption_key)
  if name.startswith('shapes/'):
    problem = _shapes_name_problem(name)
    if problem or process_count == 1 or newest_version(name, data_dir):
      return problem
    return (f'shapes dataset {name!r} is not under data_dir {data_dir!r} and {process_count} '
            'processes cannot all build it: build it first with '
            f'`{shapes_command(name, data_dir)}`')
  folder = epath.Path(data_dir).joinpath(*name.split('/'))
  if newest_version(name, data_dir) or _configs(folder):  # _configs: 'name' of 'name/config'
    return None
  return _not_found(name, data_dir)


def newest_version(name, data_dir):
  """The newest prepared version folder of `name` under `data_dir` (local or gs://), or None."""
  folder = epath.Path(data_dir).joinpath(*name.split('/'))
  if not folder.is_dir():
    return None
  versions = [v.name for v in folder.iterdir()
              if _is_version(v.name) and (v / 'dataset_info.json').exists()]
  if not versions:
    return None
  return str(folder / max(versions, key=tfds.core.Version))  # 1.10.0 after 1.9.0


def fingerprint(name, data_dir):
  """A digest of what the prepared dataset holds: its version folder's metadata, its source
  record (folder builds) and its data files' names and sizes, or its shards' paths, sizes and
  modification times; 'unknown' when not found."""
  if shards.split_name(name):
    paths, missing = shards.match(shards.split_name(name)[1], data_dir)
    return 'unknown' if missing or not paths else shards.fingerprint(paths)
  version_dir = newest_version(name, data_dir)
  if version_dir is None:
    return 'unknown'
  where = version_dir if '://' in version_dir else os.path.abspath(version_dir)
  h = hashlib.sha256(where.encode())
  for entry in sorted(epath.Path(version_dir).iterdir(), key=lambda e: e.name):
    h.update(f'{entry.name}:{entry.stat().length};'.encode())
    if entry.name.endswith('.json'):  # dataset_info, features, source record
      h.update(entry.read_bytes())
  return h.hexdigest()


def shapes_command(name, data_dir):
  """The command that builds shapes dataset `name` (a well-formed one) into `data_dir`."""
  size, train, holdout, seed, layout = SHAPES_NAME.fullmatch(name).groups()
  return (f'python -m ldm_jax.data build shapes --data_dir {data_dir} --image_size {size} '
          f'--num_train {train} --num_holdout {holdout} --seed {seed}'
          + (f' --layout {layout}' if layout else ''))


def _shapes_name_problem(name):
  from ldm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  m = SHAPES_NAME.fullmatch(name)
  if m is None:
    return (f'{name!r} is not a shapes dataset name: the format is {SHAPES_FORMAT} (as '
            '`python -m ldm_jax.data build shapes` names it)')
  size, _, _, _, layout = m.groups()
  if layout is not None and (layout not in shapes.LAYOUTS or layout == 'scattered'):
    return (f'{name!r}: unknown shapes layout {layout!r}; the suffix is _centered or none '
            f'(scattered); the format is {SHAPES_FORMAT}')
  if int(size) < 8:
    return f'{name!r}: shapes images of {size} px are too small (8 or more)'
  return None


def _build_shapes(name, data_dir):
  """Builds a missing shapes dataset named `name`, or raises saying how."""
  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax.data import builders  # pylint: disable=g-import-not-at-top
  problem = _shapes_name_problem(name)
  if problem:
    raise FileNotFoundError(f'dataset {name!r} is not under data_dir {data_dir!r}, and {problem}')
  if jax.process_count() > 1:
    raise FileNotFoundError(
        f'shapes dataset {name!r} is not under data_dir {data_dir!r}; with several processes it '
        f'is not built on demand: build it first with `{shapes_command(name, data_dir)}`')
  size, train, holdout, seed, layout = SHAPES_NAME.fullmatch(name).groups()
  logging.info('building %s in %s (synthetic and deterministic; it was not there)', name, data_dir)
  builders.build_shapes(data_dir, image_size=int(size), num_train=int(train),
                        num_holdout=int(holdout), seed=int(seed), layout=layout or 'scattered')


def _shard_source(name, split, data_dir, image_key, caption_key):
  """The webdataset or parquet source of a shard name (see `data_source`)."""
  scheme, pattern = shards.split_name(name)
  if split != 'train':
    raise ValueError(f'dataset {name!r} has no split {split!r}: shards have one split, '
                     "'train' (all their records); hold records out by naming other shards")
  paths = shards.resolve(scheme, pattern, data_dir)
  if scheme == 'webdataset':
    return webdataset.Source(paths, image_key, caption_key)
  from ldm_jax.data import parquet  # pylint: disable=g-import-not-at-top  (pyarrow: parquet only)
  return parquet.Source(paths, image_key, caption_key)


def _shards_problem(name, data_dir, image_key, caption_key):
  """check_name for 'webdataset:' and 'parquet:' names: matches, tar ends, parquet columns."""
  scheme, pattern = shards.split_name(name)
  problem = shards.match_problem(scheme, pattern, data_dir)
  if problem:
    return problem
  paths, _ = shards.match(pattern, data_dir)
  if scheme == 'parquet':
    from ldm_jax.data import parquet  # pylint: disable=g-import-not-at-top
    return parquet.schema_problem(paths[0], image_key, caption_key)
  problems = [p for p in map(webdataset.quick_problem, paths) if p]
  if len(problems) > 1:
    return f'{len(problems)} of the {len(paths)} shards are damaged; the first: {problems[0]}'
  return problems[0] if problems else None


def _not_found(name, data_dir):
  """The message for a missing dataset: what data.name takes and what data_dir holds."""
  if name.startswith('image_folder/'):
    how = (f'build it: `python -m ldm_jax.data build folder --src DIR --data_dir {data_dir}` '
           f'(it is named after DIR; --name {name.split("/", 1)[1]} names it so)')
  elif name.startswith('precomputed/'):
    how = 'precomputed datasets are written by ldm_jax.data.precompute (or precompute_latents)'
  else:
    how = f'data.name takes: {_SCHEMES}'
  held = _prepared(data_dir)
  where = (f'data_dir {data_dir!r} does not exist' if not epath.Path(data_dir).is_dir()
           else f'data_dir {data_dir!r} holds {held}' if held
           else f'data_dir {data_dir!r} holds no prepared dataset')
  return f'dataset {name!r} is not prepared under data_dir {data_dir!r}: {how}. {where}'


def _prepared(data_dir, limit=20):
  """Names of the prepared datasets under `data_dir` (two levels: 'name' or 'name/config')."""
  root, found = epath.Path(data_dir), []
  if not root.is_dir():
    return found
  for top in sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != 'downloads'):
    if newest_version(top, data_dir):
      found.append(top)
    found += [f'{top}/{sub}' for sub in _configs(root / top)]
  return found[:limit] + ([f'... ({len(found) - limit} more)'] if len(found) > limit else [])


def _configs(folder):
  """The prepared configs in `folder` (a tfds name's folder: data_dir/name/config/version)."""
  folder = epath.Path(folder)
  if not folder.is_dir():
    return []
  return sorted(sub.name for sub in folder.iterdir()
                if not _is_version(sub.name) and newest_version(sub.name, folder))


def _is_version(name):
  parts = name.split('.')
  return len(parts) == 3 and all(p.isdigit() for p in parts)
