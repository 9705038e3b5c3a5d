"""Parquet files of images and captions (img2dataset's `--output_format parquet`, Hugging Face
parquet exports) read in place, at random.

A record is a row: the image bytes of column `data.image_key` and the caption of column
`data.caption_key`. The defaults also read img2dataset's layout: image_key 'image' takes column
'jpg' in a file without an 'image' column, caption_key 'caption' takes 'txt' in one without
'caption'. An image column of Hugging Face's Image feature (a struct with 'bytes') works too.

Each file is indexed once (its row groups and the rows that have an image: img2dataset keeps a
row with a null image for each failed download), the index cached (`shards.cached_index`). Rows
without an image are left out there and counted; a null caption is the empty caption (trained
unconditional unless `data.skip_empty_captions`). A record is read from its row group, which
each process keeps in a small LRU cache: under a global shuffle nearly every record reads a
whole row group, so small row groups (img2dataset writes 100 rows) read fastest.

The index also holds each record's image size (`Source.sizes`, for aspect-ratio buckets). A file
of img2dataset's layout has them in its 'width' and 'height' columns, read without the images;
other files' image headers are read at indexing, one row group's image column at a time (the
whole file is read once). img2dataset's sizes are of the stored image as OpenCV reads it,
without its EXIF orientation: exact for the images it re-encodes (its default, which drops the
EXIF); an image kept as downloaded (`--skip_reencode True` without resizing) keeps its
orientation, so a quarter-turned one goes to the transposed aspect ratio's bucket (and is still
resized and cropped to fit it).
"""

import collections
import functools
import logging
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ldm_jax.data import shards

# Column names of img2dataset's parquet output that the default keys fall back to.
FALLBACK_COLUMNS = {'image': 'jpg', 'caption': 'txt'}
KEY_COLUMN = 'key'  # names records in logs when present (img2dataset writes it)
# img2dataset's columns: the stored image's (width, height), and its size as downloaded (present
# only to tell img2dataset's files from others that have a 'width' of another meaning).
SIZE_COLUMNS = ('width', 'height')
_IMG2DATASET_SIZES = SIZE_COLUMNS + ('original_width', 'original_height')
ROW_GROUPS_CACHED = 8  # decoded row groups each process keeps
_BIG_ROW_GROUP = 64 << 20  # bytes (uncompressed) past which random reads get slow: warned about


def columns(names, image_key, caption_key):
  """(image column, caption column) of a file with columns `names`, or (None, message)."""
  found = []
  for key, what in ((image_key, 'image_key'), (caption_key, 'caption_key')):
    column = key if key in names else FALLBACK_COLUMNS.get(key)
    if column not in names:
      also = f" (nor {FALLBACK_COLUMNS[key]!r})" if key in FALLBACK_COLUMNS else ''
      example = 'jpg' if what == 'image_key' else 'txt'
      return None, (f'has no column {key!r}{also} for data.{what}; its columns are '
                    f'{list(names)}: set --config.data.{what} to the one holding the '
                    f'{"image bytes" if what == "image_key" else "captions"} (e.g. {example})')
    found.append(column)
  return tuple(found), None


def schema_problem(path, image_key='image', caption_key='caption'):
  """What is wrong with the columns of parquet file `path` for these keys (None: nothing);
  reads only its footer."""
  try:
    schema = pq.read_schema(path)
  except (pa.ArrowException, OSError) as e:
    return f'parquet file {path} cannot be read: {e}'
  cols, problem = columns(schema.names, image_key, caption_key)
  if problem is None:
    problem = _type_problem(schema, *cols)
  return f'parquet file {path} {problem}' if problem else None


def _type_problem(schema, image_column, caption_column):
  image, caption = schema.field(image_column).type, schema.field(caption_column).type
  if not (_is_bytes(image) or (pa.types.is_struct(image) and image.get_field_index('bytes') >= 0
                               and _is_bytes(image.field('bytes').type))):
    return (f'has column {image_column!r} of type {image}, not image bytes (binary, or a struct '
            "with 'bytes' as Hugging Face's Image feature writes)")
  if not (_is_bytes(caption) or pa.types.is_string(caption) or pa.types.is_large_string(caption)):
    return f'has column {caption_column!r} of type {caption}, not caption text (string)'
  return None


def _is_bytes(t):
  return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def index_file(path, image_key='image', caption_key='caption'):
  """The rows of parquet file `path` that have an image, by row group.

  Returns:
    A dict of numpy arrays: 'rg', 'row' (n,) int32 (row group, row in it, of each record);
    'rg_start' (row groups,) int64 (each row group's first row in the file); 'columns' (the
    image, caption and, when there is one, key column); 'sizes' (n, 2) int32, each record's
    image (width, height) as decoded, (-1, -1) where its header cannot be read; 'no_image' and
    'no_caption' (rows; -1 when the file's statistics do not say); 'max_rg_bytes'.

  Raises:
    ValueError: the file is not parquet or lacks the columns (listing those it has).
  """
  problem = schema_problem(path, image_key, caption_key)
  if problem:
    raise ValueError(problem)
  pf = pq.ParquetFile(path)
  names = pf.schema_arrow.names
  (image_column, caption_column), _ = columns(names, image_key, caption_key)
  md = pf.metadata
  rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
  rgs, rows = [], []
  for i, n in enumerate(rg_rows):
    valid = np.arange(n) if _nulls(md, i, image_column) == 0 else _valid_rows(pf, i, image_column)
    rgs.append(np.full(len(valid), i, np.int32))
    rows.append(valid.astype(np.int32))
  rg, row = (np.concatenate(x) if x else np.zeros(0, np.int32) for x in (rgs, rows))
  rg_start = np.cumsum([0] + rg_rows[:-1]).astype(np.int64)
  no_caption = [_nulls(md, i, caption_column) for i in range(md.num_row_groups)]
  key = [KEY_COLUMN] if KEY_COLUMN in names and KEY_COLUMN not in (image_column, caption_column) \
      else []
  return {'rg': rg, 'row': row, 'rg_start': rg_start,
          'sizes': _sizes(pf, image_column, rg, row, rg_start),
          'columns': np.array([image_column, caption_column] + key),
          'no_image': np.array(sum(rg_rows) - len(rg)),
          'no_caption': np.array(-1 if None in no_caption else sum(no_caption)),
          'max_rg_bytes': np.array(max([md.row_group(i).total_byte_size
                                        for i in range(md.num_row_groups)], default=0))}


def _nulls(md, rg, column):
  """Nulls in `column` of row group `rg` by the file's statistics (None when they do not say);
  a struct column (Hugging Face's Image) counts by its 'bytes' field."""
  group = md.row_group(rg)
  for j in range(group.num_columns):
    chunk = group.column(j)
    if chunk.path_in_schema in (column, f'{column}.bytes'):
      stats = chunk.statistics
      return stats.null_count if stats is not None and stats.has_null_count else None
  return None


def _valid_rows(pf, rg, column):
  """Rows of row group `rg` whose image is not null (reads the image column of that group)."""
  values = pf.read_row_group(rg, columns=[column]).column(0).combine_chunks()
  valid = values.is_valid().to_numpy(zero_copy_only=False)
  if pa.types.is_struct(values.type):
    valid &= values.field('bytes').is_valid().to_numpy(zero_copy_only=False)
  return np.flatnonzero(valid)


def _sizes(pf, image_column, rg, row, rg_start):
  """(n, 2) int32 (width, height) of the images at rows `row` of row groups `rg`: img2dataset's
  size columns where the file has them and they are not null, else (there) the headers."""
  sizes = np.full((len(rg), 2), -1, np.int32)
  schema = pf.schema_arrow
  if all(c in schema.names and pa.types.is_integer(schema.field(c).type)
         for c in _IMG2DATASET_SIZES):
    table = pf.read(columns=list(SIZE_COLUMNS), use_threads=False)
    for j, column in enumerate(SIZE_COLUMNS):
      sizes[:, j] = table.column(column).fill_null(-1).to_numpy()[rg_start[rg] + row]
  unknown = (sizes <= 0).any(axis=1)
  for group in np.unique(rg[unknown]):
    values = pf.read_row_group(int(group), columns=[image_column]).column(0).combine_chunks()
    if pa.types.is_struct(values.type):  # Hugging Face's Image feature
      values = values.field('bytes')
    for k in np.flatnonzero(unknown & (rg == group)):
      sizes[k] = shards.image_size(values[int(row[k])].as_py())
  return sizes


class Source:
  """The rows of parquet files as a random-access source for grain.

  `source[i]` is a dict: the image bytes under `image_key`, the caption under `caption_key`
  (UTF-8 bytes; b'' when null) and 'file_name' ('<file>:<key column or row>', for logs).
  Picklable for grain's worker processes: each opens the files and caches row groups itself.
  """

  def __init__(self, paths, image_key='image', caption_key='caption',
               row_groups_cached=ROW_GROUPS_CACHED):
    """Indexes (or reads the cached indexes of) `paths`, the parquet files, in order.

    Raises:
      ValueError: a file is not parquet or lacks the columns, or no row has an image.
    """
    self.paths, self.names = list(paths), shards.display_names(paths)
    self.image_key, self.caption_key = image_key, caption_key
    build = functools.partial(index_file, image_key=image_key, caption_key=caption_key)
    indexes = shards.index_all(
        self.paths, lambda p: shards.cached_index(p, build, image_key=image_key,
                                                  caption_key=caption_key), 'parquet files')
    self._file = np.concatenate([np.full(len(ix['rg']), i, np.int32)
                                 for i, ix in enumerate(indexes)])
    self._rg = np.concatenate([ix['rg'] for ix in indexes])
    self._row = np.concatenate([ix['row'] for ix in indexes])
    self._sizes = np.concatenate([ix['sizes'] for ix in indexes])
    self._rg_start = [ix['rg_start'] for ix in indexes]
    self._columns = [[str(c) for c in ix['columns']] for ix in indexes]
    self.stats = _stats(indexes)
    _log_stats(self.stats, [n for n, ix in zip(self.names, indexes) if int(ix['no_image'])])
    if not len(self._file):
      raise ValueError(f'the {len(self.paths)} parquet files hold no row with an image in '
                       f'column {self._columns[0][0]!r}: {shards.first(self.paths)}')
    self._cache = _RowGroups(row_groups_cached)
    self._files, self._lock = {}, threading.Lock()

  def __len__(self):
    return len(self._file)

  def sizes(self):
    """(n, 2) int32: each record's image (width, height) as it will be decoded (EXIF orientation
    applied), from the index; (-1, -1) where the header cannot be read (the decode skips it)."""
    return self._sizes

  def __getitem__(self, index):
    index = int(index)
    f, rg, row = int(self._file[index]), int(self._rg[index]), int(self._row[index])
    table = self._cache.get((f, rg), lambda: self._read(f, rg))
    image = table.column(0)[row].as_py()
    if isinstance(image, dict):  # Hugging Face's Image feature
      image = image.get('bytes')
    caption = table.column(1)[row].as_py()  # str, bytes or None: bytes as tfds Text gives
    key = (table.column(2)[row].as_py() if table.num_columns > 2
           else int(self._rg_start[f][rg]) + row)
    return {self.image_key: image or b'',
            self.caption_key: caption.encode() if isinstance(caption, str) else caption or b'',
            'file_name': f'{self.names[f]}:{key}'}

  def _read(self, f, rg):
    """Row group `rg` of file `f` (its record columns): one reader per file and process."""
    with self._lock:
      if f not in self._files:
        self._files[f] = (pq.ParquetFile(self.paths[f]), threading.Lock())
      reader, lock = self._files[f]
    with lock:  # a ParquetFile is not documented as safe for concurrent reads
      return reader.read_row_group(rg, columns=self._columns[f], use_threads=False)

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_files'], state['_lock'] = {}, None  # each process opens and caches its own
    state['_cache'] = self._cache.size
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock, self._cache = threading.Lock(), _RowGroups(state['_cache'])

  def __repr__(self):
    return f'parquet.Source({len(self)} rows in {len(self.paths)} files)'


def _stats(indexes):
  no_caption = [int(ix['no_caption']) for ix in indexes]
  return {'files': len(indexes), 'rows': sum(len(ix['rg']) for ix in indexes),
          'no_image': sum(int(ix['no_image']) for ix in indexes),
          'unknown_size': sum(int((ix['sizes'][:, 0] < 0).sum()) for ix in indexes),
          'no_caption': -1 if -1 in no_caption else sum(no_caption),
          'max_row_group_bytes': max(int(ix['max_rg_bytes']) for ix in indexes)}


def _log_stats(stats, files_without_images):
  logging.info('parquet: %d rows with an image in %d files', stats['rows'], stats['files'])
  if stats['no_image']:
    logging.warning('%d parquet rows have no image (a null value: img2dataset\'s failed '
                    'downloads) and are left out: in %s', stats['no_image'],
                    shards.first(files_without_images))
  if stats['unknown_size']:
    logging.warning('%d parquet rows have an image whose header cannot be read: they will not '
                    'decode, and are skipped when read', stats['unknown_size'])
  if stats['no_caption'] > 0:
    logging.info('%d parquet rows have a null caption: they get the empty caption (trained '
                 'unconditional; data.skip_empty_captions=True skips them)', stats['no_caption'])
  if stats['max_row_group_bytes'] > _BIG_ROW_GROUP:
    logging.warning('parquet row groups of up to %d MB: under a shuffle each record read reads '
                    'its whole row group; rewrite the files with smaller ones (pyarrow.parquet.'
                    'write_table(..., row_group_size=100)) or use webdataset shards',
                    stats['max_row_group_bytes'] >> 20)


class _RowGroups:
  """A thread-safe LRU of row groups; a group being read by one thread is waited for, not read
  again by another."""

  def __init__(self, size):
    self.size, self._tables = size, collections.OrderedDict()
    self._loading, self._lock = {}, threading.Lock()

  def get(self, key, read):
    while True:
      with self._lock:
        if key in self._tables:
          self._tables.move_to_end(key)
          return self._tables[key]
        pending = self._loading.get(key)
        if pending is None:
          pending = self._loading[key] = threading.Event()
          break
      pending.wait()  # another thread reads it; take it from the cache then (or read it)
    try:
      table = read()
      with self._lock:
        self._tables[key] = table
        while len(self._tables) > self.size:
          self._tables.popitem(last=False)
      return table
    finally:
      with self._lock:
        del self._loading[key]
      pending.set()
