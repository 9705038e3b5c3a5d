"""Random-access record sources: our builders' outputs or any locally prepared tfds dataset."""

import os

import tensorflow_datasets as tfds


def data_source(name, split, data_dir):
  """The split of a prepared dataset as a random-access source (ArrayRecord, no TensorFlow).

  Args:
    name: 'shapes/<config>' or 'image_folder/<config>' as the builders return it, or any tfds
      name ('coco_captions', 'name/config') prepared under `data_dir` in array_record format.
    split: a split name ('train', 'holdout', ...), or a tfds slice ('train[:90%]').
    data_dir: the tfds data directory.

  Returns:
    A sequence of records (dicts of numpy arrays / bytes).
  """
  folder = os.path.join(data_dir, *name.split('/'))
  if os.path.isdir(folder):
    versions = sorted((v for v in os.listdir(folder) if _is_version(v)),
                      key=tfds.core.Version)  # by number: 1.10.0 after 1.9.0
    if not versions:
      raise FileNotFoundError(f'{folder} holds no prepared version of {name!r}; rebuild it')
    builder = tfds.builder_from_directory(os.path.join(folder, versions[-1]))
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names
      raise FileNotFoundError(
          f'dataset {name!r} is not under data_dir {data_dir!r}. Build it first: '
          f'`python -m ldm_jax.data build shapes --data_dir {data_dir}` or `build folder --src DIR '
          f'--data_dir {data_dir}`, or prepare a tfds dataset there') from e
    if not builder.is_prepared():
      raise FileNotFoundError(f'tfds dataset {name!r} is not prepared under {data_dir!r}; '
                              'prepare it (array_record format) before training')
  available = list(builder.info.splits.keys())
  if split.split('[')[0] not in available:
    raise ValueError(f'dataset {name!r} has no split {split!r}; it has {available}')
  return builder.as_data_source(split)


def _is_version(name):
  parts = name.split('.')
  return len(parts) == 3 and all(p.isdigit() for p in parts)
