"""webdataset tar shards (img2dataset's `--output_format webdataset`) read in place, at random.

A sample is a run of consecutive members sharing a key: the member's path up to the first dot
of its file name (000000001.jpg, 000000001.txt and 000000001.json are sample 000000001, as the
webdataset package groups them). Its image is its first member with an image extension, its
caption its .txt member. Each tar is indexed once (where every sample's image and caption bytes
lie: tarfile's offset_data and size), the index cached (`shards.cached_index`); a record is then
two plain reads at those offsets, in any order, from any process.

The index also holds each sample's image size (`Source.sizes`, for aspect-ratio buckets), read
from the image member's header: its first 16 KiB, all of it only when the header runs past them.

Samples without an image member are left out at indexing and counted (`Source.stats`, logged
once); samples without a caption get the empty caption, which trains the unconditional model
unless `data.skip_empty_captions` (the loader counts those it skips).
"""

import logging
import os
import tarfile
import threading
import weakref

import numpy as np

from ldm_jax.data import folder
from ldm_jax.data import shards

IMAGE_EXTENSIONS = tuple(e.lstrip('.') for e in folder.IMAGE_EXTENSIONS)
CAPTION_EXTENSION = 'txt'
_END_OF_ARCHIVE = 1024  # two zero blocks: what every complete tar ends with (then zero padding)
_MAX_OPEN = 256  # shards kept open per process; past that, a read opens and closes its shard


def split_member(name):
  """(key, extension) of a tar member name, as webdataset splits it; (None, None) without a dot.

  '000000001.jpg' -> ('000000001', 'jpg'); 'part/0001.seg.png' -> ('part/0001', 'seg.png').
  """
  head, base = os.path.split(name)
  if base.startswith('.') or '.' not in base:  # webdataset leaves these out too
    return None, None
  stem, ext = base.split('.', 1)
  return (os.path.join(head, stem) if head else stem), ext


def _is_image(ext):
  return ext.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS


def index_tar(path):
  """Where every sample of tar `path` has its image and caption bytes.

  Returns:
    A dict of numpy arrays: 'keys' (n,) bytes; 'image' (n, 2) and 'caption' (n, 2) int64 as
    (offset, size), the caption's offset -1 when it has none; 'sizes' (n, 2) int32, the image's
    (width, height) as decoded, (-1, -1) where its header cannot be read; 'no_image' (the number
    of samples left out for want of an image member) and 'no_image_keys' (the first few of
    them).

  Raises:
    ValueError: the file is compressed, not a tar, or truncated (each named, with the fix).
  """
  problem = _compressed(path)
  if problem:
    raise ValueError(problem)
  try:
    with tarfile.open(path, 'r:') as tar:
      samples = _samples(tar)
      end = tar.offset  # the block after the last member: tar's end-of-archive marker
  except tarfile.ReadError as e:
    raise ValueError(_damaged(path, f'tarfile cannot read it ({e})')) from None
  problem = _end_problem(path, end)
  if problem:
    raise ValueError(_damaged(path, problem))
  kept = [s for s in samples if s[1] is not None]
  no_image = [s[0] for s in samples if s[1] is None]
  image = np.array([s[1] for s in kept], np.int64).reshape(-1, 2)
  return {
      'keys': np.array([s[0].encode() for s in kept], dtype=bytes),
      'image': image,
      'sizes': _image_sizes(path, image),
      'caption': np.array([s[2] or (-1, 0) for s in kept], np.int64).reshape(-1, 2),
      'no_image': np.array(len(no_image)),
      'no_image_keys': np.array([k.encode() for k in no_image[:5]], dtype=bytes),
  }


def _samples(tar):
  """[key, (image offset, size) or None, (caption offset, size) or None] per sample, in order."""
  samples = []
  for member in tar:
    if not member.isfile():
      continue
    key, ext = split_member(member.name)
    if key is None:
      continue
    if not samples or samples[-1][0] != key:
      samples.append([key, None, None])
    where = (member.offset_data, member.size)
    if samples[-1][1] is None and _is_image(ext):
      samples[-1][1] = where
    elif samples[-1][2] is None and ext.lower() == CAPTION_EXTENSION:
      samples[-1][2] = where
  return samples


def _image_sizes(path, image):
  """(n, 2) int32 (width, height) of the images at `image`'s (offset, size) in tar `path`, from
  their headers."""
  fd = os.open(path, os.O_RDONLY)
  try:
    sizes = [shards.image_size_at(lambda n, at=int(at): os.pread(fd, n, at), int(size))
             for at, size in image]
  finally:
    os.close(fd)
  return np.array(sizes, np.int32).reshape(-1, 2)


def _end_problem(path, end):
  """Why tar `path` does not end with the end-of-archive marker at `end` (None when it does)."""
  size = os.path.getsize(path)
  if size < end + _END_OF_ARCHIVE:
    return f'it ends at byte {size} without the end-of-archive marker after its last member'
  with open(path, 'rb') as f:
    f.seek(end)
    if f.read(_END_OF_ARCHIVE).strip(b'\0'):
      return f'at byte {end} there is neither a member header nor the end-of-archive marker'
  return None


def _compressed(path):
  """The message for a compressed tar (gzip, bzip2, xz), else None."""
  with open(path, 'rb') as f:
    magic = f.read(6)
  if magic[:2] == b'\x1f\x8b' or magic[:3] == b'BZh' or magic == b'\xfd7zXZ\x00':
    return (f'webdataset shard {path} is compressed: records cannot be read in place from a '
            'compressed tar; decompress it (e.g. gunzip) and name the .tar')
  return None


def _damaged(path, why):
  return (f'webdataset shard {path} is truncated or damaged: {why} (an interrupted download '
          'or copy?); fetch it again, or leave it out of data.name\'s pattern')


def quick_problem(path):
  """A truncation that shows without indexing: the size or the last 1 KiB of tar `path` (every
  complete tar ends with 1 KiB of zeros); None when it looks whole."""
  size = os.path.getsize(path)
  if _compressed(path):
    return _compressed(path)
  if size < _END_OF_ARCHIVE or size % 512:
    return _damaged(path, f'its size, {size} bytes, is not a whole number of 512-byte blocks')
  with open(path, 'rb') as f:
    f.seek(size - _END_OF_ARCHIVE)
    if f.read(_END_OF_ARCHIVE).strip(b'\0'):
      return _damaged(path, 'it does not end with the end-of-archive marker')
  return None


class Source:
  """The samples of webdataset shards as a random-access source for grain.

  `source[i]` is a dict: the image bytes under `image_key`, the caption bytes under
  `caption_key` (b'' when the sample has none) and 'file_name' ('<shard>:<key>', for logs).
  Picklable for grain's worker processes: each process opens the shards itself, on first read.
  """

  def __init__(self, paths, image_key='image', caption_key='caption'):
    """Indexes (or reads the cached indexes of) `paths`, the tar files, in order.

    Raises:
      ValueError: a shard is compressed, truncated or damaged, or no shard holds an image.
    """
    self.paths, self.names = list(paths), shards.display_names(paths)
    self.image_key, self.caption_key = image_key, caption_key
    indexes = shards.index_all(self.paths, lambda p: shards.cached_index(p, index_tar),
                               'webdataset shards')
    self._shard = np.concatenate([np.full(len(ix['keys']), i, np.int32)
                                  for i, ix in enumerate(indexes)])
    self._keys = np.concatenate([ix['keys'] for ix in indexes])
    self._image = np.concatenate([ix['image'] for ix in indexes])
    self._caption = np.concatenate([ix['caption'] for ix in indexes])
    self._sizes = np.concatenate([ix['sizes'] for ix in indexes])
    no_image = [f'{self.names[i]}:{k.decode()}' for i, ix in enumerate(indexes)
                for k in ix['no_image_keys']]
    self.stats = {'shards': len(self.paths), 'samples': len(self._keys),
                  'no_image': int(sum(int(ix['no_image']) for ix in indexes)),
                  'no_caption': int((self._caption[:, 0] < 0).sum()),
                  'unknown_size': int((self._sizes[:, 0] < 0).sum())}
    _log_stats(self.stats, no_image)
    if not len(self._keys):
      raise ValueError(f'the {len(self.paths)} webdataset shards hold no sample with an image '
                       f'member ({", ".join(IMAGE_EXTENSIONS)}): {shards.first(self.paths)}')
    self._fds, self._lock = {}, threading.Lock()
    weakref.finalize(self, _close, self._fds)

  def __len__(self):
    return len(self._keys)

  def sizes(self):
    """(n, 2) int32: each sample's image (width, height) as it will be decoded (EXIF orientation
    applied), from the index; (-1, -1) where the header cannot be read (the decode skips it)."""
    return self._sizes

  def __getitem__(self, index):
    index = int(index)
    shard = int(self._shard[index])
    (image_at, image_size), (caption_at, caption_size) = self._image[index], self._caption[index]
    fd, keep = self._open(shard)
    try:
      image = os.pread(fd, int(image_size), int(image_at))
      caption = os.pread(fd, int(caption_size), int(caption_at)) if caption_at >= 0 else b''
    finally:
      if not keep:
        os.close(fd)
    return {self.image_key: image, self.caption_key: caption,
            'file_name': f'{self.names[shard]}:{self._keys[index].decode()}'}

  def _open(self, shard):
    """(a file descriptor of `shard`, whether it stays open); pread needs no lock to share it."""
    fd = self._fds.get(shard)
    if fd is not None:
      return fd, True
    with self._lock:
      if shard in self._fds:
        return self._fds[shard], True
      fd = os.open(self.paths[shard], os.O_RDONLY)
      if len(self._fds) < _MAX_OPEN:
        self._fds[shard] = fd
        return fd, True
    return fd, False

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_fds'], state['_lock'] = {}, None  # each process opens its own
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    weakref.finalize(self, _close, self._fds)

  def __repr__(self):
    return f'webdataset.Source({len(self)} samples in {len(self.paths)} shards)'


def _close(fds):
  """Closes a source's open shards (when it is collected, or at exit)."""
  for fd in fds.values():
    try:
      os.close(fd)
    except OSError:
      pass


def _log_stats(stats, no_image):
  logging.info('webdataset: %d samples in %d shards', stats['samples'], stats['shards'])
  if stats['no_image']:
    logging.warning('%d webdataset samples have no image member (%s) and are left out: %s',
                    stats['no_image'], ', '.join(IMAGE_EXTENSIONS), ', '.join(no_image[:5])
                    + (', ...' if stats['no_image'] > 5 else ''))
  if stats['unknown_size']:
    logging.warning('%d webdataset samples have an image whose header cannot be read: they will '
                    'not decode, and are skipped when read', stats['unknown_size'])
  if stats['no_caption']:
    logging.info('%d webdataset samples have no .%s caption: they get the empty caption (trained '
                 'unconditional; data.skip_empty_captions=True skips them)', stats['no_caption'],
                 CAPTION_EXTENSION)
