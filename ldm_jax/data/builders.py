"""tensorflow-datasets builders (array_record, no TensorFlow needed): shapes and image folders.

  build_shapes(data_dir, image_size=32, num_train=2000) -> 'shapes/s32_n2000_h200_seed0'
  (layout='centered' appends '_centered')
  build_folder(src, data_dir) -> 'image_folder/<folder name>' (rebuilt when the folder changes)

The returned name is what `sources.data_source(name, split, data_dir)` and the training config's
`data.name` take.
"""

import json
import logging
import os
import re

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data import folder as folder_lib
from ldm_jax.data import shapes as shapes_lib


# What changed is in Shapes.RELEASE_NOTES. Building again adds the new version's folder beside
# an older one, and `sources.data_source` reads the newest version there.
_SHAPES_VERSION = tfds.core.Version('1.1.0')


class ShapesConfig(tfds.core.BuilderConfig):
  """Size, seed and layout of a shapes build; the config name records them."""

  def __init__(self, *, image_size=32, num_train=2000, num_holdout=200, seed=0,
               layout='scattered'):
    suffix = '' if layout == 'scattered' else f'_{layout}'
    super().__init__(name=f's{image_size}_n{num_train}_h{num_holdout}_seed{seed}{suffix}',
                     version=_SHAPES_VERSION,
                     description=f'{image_size}px shapes, seed {seed}, {layout}')
    self.image_size, self.num_train, self.num_holdout, self.seed, self.layout = (
        image_size, num_train, num_holdout, seed, layout)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with captions; `holdout` has colour/shape pairs that `train` lacks."""
  VERSION = _SHAPES_VERSION
  RELEASE_NOTES = {'1.1.0': "Squares fill the circle's bounding box (were 0.9 of it): at 32 px "
                            'their corners are what tells them from circles.',
                   '1.0.0': 'First release.'}
  BUILDER_CONFIGS = [ShapesConfig()]

  def _info(self):
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
        'caption': tfds.features.Text(),
        'colour': tfds.features.Text(),  # of the first object
        'shape': tfds.features.Text(),
        'background': tfds.features.Text(),
        'num_shapes': tfds.features.Scalar(dtype=np.int32),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'holdout': self._generate_examples('holdout', c.num_holdout)}

  def _generate_examples(self, split, n):
    c = self.builder_config
    for i in range(n):
      ex = shapes_lib.make_example(split, i, c.image_size, c.seed, layout=c.layout)
      yield i, {'image': ex.image, 'caption': ex.caption, 'colour': ex.shapes[0].colour,
                'shape': ex.shapes[0].shape, 'background': ex.background,
                'num_shapes': len(ex.shapes)}


class FolderConfig(tfds.core.BuilderConfig):
  """A folder build; its name is the folder's (lowercase, [a-z0-9_]) unless given."""

  def __init__(self, *, src, keep_empty_captions=False, name=None):
    name = re.sub(r'[^a-z0-9_]+', '_',
                  (name or os.path.basename(os.path.normpath(src))).lower()) or 'images'
    super().__init__(name=name, version=tfds.core.Version('1.0.0'),
                     description=f'images of {os.path.abspath(src)}')
    self.src, self.keep_empty_captions = src, keep_empty_captions
    self.scanned = None  # (pairs, ScanStats) of `folder.scan`, when done before the build


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of captioned images; images are stored as file bytes and decoded by the loader."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = []

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file
        'caption': tfds.features.Text(),
        'file_name': tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    # build_folder scans first (a broken folder fails before an old build is replaced).
    pairs, self.scan_stats = c.scanned or folder_lib.scan(c.src, c.keep_empty_captions)
    return {'train': self._generate_examples(pairs)}

  def _generate_examples(self, pairs):
    src = self.builder_config.src
    for name, text in pairs:
      with open(os.path.join(src, name), 'rb') as f:
        yield name, {'image': f.read(), 'caption': text, 'file_name': name}


def build_shapes(data_dir, image_size=32, num_train=2000, num_holdout=200, seed=0,
                 layout='scattered'):
  """Builds (or reuses) a shapes dataset; returns its name for `sources.data_source`."""
  shapes_lib.make_example('train', 0, layout=layout)  # an unknown layout fails before tfds
  config = ShapesConfig(image_size=image_size, num_train=num_train, num_holdout=num_holdout,
                        seed=seed, layout=layout)
  builder = Shapes(config=config, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return f'shapes/{config.name}'


def build_folder(src, data_dir, keep_empty_captions=False, overwrite=False, name=None):
  """Builds a dataset from a folder of captioned images, or finds it built from the same files.

  The build records its source (`folder.fingerprint`: absolute path, options, each file's size
  and modification time) in `source.json` in its version folder. A build of the same name from
  the same folder whose files changed (or with other options) is rebuilt; from another folder
  it is refused unless `overwrite`.

  Args:
    src: the folder (metadata.jsonl / metadata.csv / name.txt captions).
    data_dir: the tfds data directory.
    keep_empty_captions: keep images with empty captions (see `folder.scan`).
    overwrite: replace a dataset of the same name built from another folder.
    name: the dataset's config name (default: the folder's name).

  Returns:
    (dataset name for `sources.data_source`, scan summary or 'already built (<summary>)').

  Raises:
    FileNotFoundError, ValueError: `src` is missing or holds no captioned images (see `scan`).
    FileExistsError: the name is taken by a build of another folder and not `overwrite`.
  """
  config = FolderConfig(src=src, keep_empty_captions=keep_empty_captions, name=name)
  dataset = f'image_folder/{config.name}'
  if not os.path.isdir(src):
    raise FileNotFoundError(f'image folder {src!r} does not exist')
  source = folder_lib.fingerprint(src, {'keep_empty_captions': keep_empty_captions}, data_dir)
  builder = ImageFolder(config=config, data_dir=data_dir, file_format='array_record')
  record = epath.Path(builder.data_dir) / 'source.json'  # data_dir may be gs://
  if (epath.Path(builder.data_dir) / 'dataset_info.json').exists():  # built before
    old = read_record(record)
    change = (folder_lib.changes(old, source) if old
              else 'it has no record of its source (built by an older version)')
    if not change:
      return dataset, f'already built ({old.get("summary", "same files")})'
    if old and old.get('src') != source['src'] and not overwrite:
      raise FileExistsError(
          f'{dataset} in {data_dir} was built from {old.get("src")}, not {source["src"]}: pass '
          f'--overwrite to replace it (runs on {dataset} then read the new images), or --name '
          'NAME to build this folder under another name')
    config.scanned = folder_lib.scan(src, keep_empty_captions)
    logging.warning('rebuilding %s in %s from %s: %s', dataset, data_dir, source['src'], change)
    epath.Path(builder.data_dir).rmtree()
    builder = ImageFolder(config=config, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  stats = getattr(builder, 'scan_stats', None)  # None: tfds found it built after all
  summary = stats.summary() if stats else 'built'
  record.write_text(json.dumps(source | {'summary': summary}))
  return dataset, summary


def read_record(path):
  """A build's JSON record of what it was made from (an epath), or None when it is missing or
  unreadable (a build from before records, an interrupted write): the build is then redone."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None
