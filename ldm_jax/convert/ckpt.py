"""PyTorch `.ckpt` zip checkpoints without torch: an unpickler that rebuilds tensors, nothing else.

`torch.save` writes a zip holding `<archive>/data.pkl` (the pickled object tree) and one raw
buffer per storage under `<archive>/data/<key>`. A pickle is a program: unpickling it with the
stock `pickle.load` can import and call anything the file names (`os.system` included). Here
every global the pickle names is looked up in a fixed table of our own functions, which build
numpy arrays from the zip's buffers (and, for Lightning's metadata beside the weights, numpy
scalars and inert stand-ins for its callback classes); any other name is refused before anything
runs, so no code from the file is ever executed and torch is never imported.
"""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

from ldm_jax.convert import diffusers as diffusers_lib

# torch's storage classes -> numpy dtypes (UntypedStorage is raw bytes).
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
# numpy scalars (Lightning's `global_step`, ...) are pickled as raw bytes plus a dtype name.
_NUMPY_SCALAR_KINDS = 'biuf'
_LEGACY_MAGIC = b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19'  # pickled 0x1950a86a20f9469cfc6c


class UnsafePickleError(diffusers_lib.ConversionError):
  """A checkpoint whose pickle names something other than tensor storage: never executed."""


class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: just the element dtype."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _NumpyDType:
  """A numpy dtype by name; BUILD may set its byte order (never mutates numpy's singletons)."""

  def __init__(self, name, align=False, copy=True):
    del align, copy
    try:
      dtype = np.dtype(name) if isinstance(name, str) and name[:1] in _NUMPY_SCALAR_KINDS else None
    except TypeError:
      dtype = None
    if dtype is None or dtype.kind not in _NUMPY_SCALAR_KINDS:
      raise UnsafePickleError(f'the checkpoint pickles a numpy dtype {name!r}; only plain numeric '
                              'scalars are read')
    self.dtype = dtype

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in '<>|=':
      self.dtype = self.dtype.newbyteorder(state[1])


class _Callable:
  """A fresh wrapper per pickled reference, so that BUILD cannot touch our functions or classes."""
  __slots__ = ('fn',)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    if not callable(self.fn):
      raise UnsafePickleError('the checkpoint\'s pickle rebinds a function: refused')
    return self.fn(*args, **kwargs)


class OpaqueObject:
  """Stands in for a class that training frameworks pickle as metadata (never imported or run)."""

  def __init__(self, name, *args, **kwargs):
    del args, kwargs
    self.name = name

  def __call__(self, *args, **kwargs):
    return OpaqueObject(self.name)

  def __setstate__(self, state):
    del state

  def __repr__(self):
    return f'<{self.name}: not unpickled>'


def _numpy_scalar(dtype, data):
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
    raise UnsafePickleError('the checkpoint pickles a malformed numpy scalar')
  return np.frombuffer(data, dtype.dtype, count=1)[0]


def _codecs_encode(text, encoding='utf-8'):
  # Protocol-2 pickles spell `bytes` as _codecs.encode(str, 'latin1').
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise UnsafePickleError('the checkpoint calls _codecs.encode on something other than bytes')
  return text.encode('latin1')


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2 as numpy, with the view checked to lie inside its storage."""
  del unused
  ints = lambda xs: all(isinstance(x, int) and not isinstance(x, bool) for x in xs)
  if (not isinstance(storage, np.ndarray) or not ints((offset, *size, *stride))
      or len(size) != len(stride) or offset < 0 or min((*size, *stride), default=0) < 0):
    raise UnsafePickleError(f'the checkpoint holds a malformed tensor (offset {offset}, size '
                            f'{size}, stride {stride})')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size or np.prod(size, dtype=np.float64) > storage.size:
    raise UnsafePickleError(f'a tensor of size {tuple(size)} does not fit its storage '
                            f'({storage.size} elements): the file is corrupt')
  step = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), [s * step for s in stride])
  return np.array(view)  # its own contiguous copy


def _rebuild_parameter(data, *unused):
  del unused
  return data


# (module, name) -> what it unpickles to. Names are matched exactly; nothing is imported.
_ALLOWED = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('__builtin__', 'set'): set,
    ('_codecs', 'encode'): _codecs_encode,
    ('numpy', 'dtype'): _NumpyDType,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
}
# Lightning pickles its callbacks' classes as dictionary keys beside the weights.
_OPAQUE = {('pytorch_lightning.callbacks.model_checkpoint', 'ModelCheckpoint'),
           ('lightning.pytorch.callbacks.model_checkpoint', 'ModelCheckpoint')}


class _Unpickler(pickle.Unpickler):
  """Resolves globals only through `_ALLOWED`; storages come from the zip, read once each."""

  def __init__(self, file, archive, prefix, path):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages = {}
    self._byteorder = 'little'
    if f'{prefix}byteorder' in archive.namelist():
      self._byteorder = archive.read(f'{prefix}byteorder').decode().strip()

  def find_class(self, module, name):
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _Callable(_ALLOWED[module, name])
    if (module, name) in _OPAQUE:
      return OpaqueObject(f'{module}.{name}')
    raise UnsafePickleError(
        f'{self._path}: refused: its pickle references {module}.{name}, which is not tensor '
        'storage. ldm_jax never executes pickled code: it only rebuilds tensors. If the file is '
        'trusted, convert it once where torch is installed, e.g. `safetensors.torch.save_file('
        'torch.load(path, weights_only=True)["state_dict"], "model.safetensors")`.')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise UnsafePickleError(f'{self._path}: refused: an unknown persistent id {pid!r:.80}')
    _, kind, key, _, numel = pid
    if not isinstance(kind.dtype, np.dtype) or not isinstance(numel, int):
      raise UnsafePickleError(f'{self._path}: refused: a malformed storage reference')
    if key not in self._storages:
      name = f'{self._prefix}data/{key}'
      try:
        raw = self._archive.read(name)
      except KeyError as e:
        raise diffusers_lib.ConversionError(f'{self._path}: storage {name} is missing: the file '
                                            'is truncated or corrupt') from e
      dtype = kind.dtype.newbyteorder('>' if self._byteorder == 'big' else '<')
      if len(raw) < numel * dtype.itemsize:
        raise diffusers_lib.ConversionError(f'{self._path}: storage {name} holds {len(raw)} bytes, '
                                            f'{numel} x {dtype.itemsize} expected: truncated')
      self._storages[key] = np.frombuffer(raw, dtype, count=numel).astype(kind.dtype)
    return self._storages[key]


def load(path):
  """Unpickles a `torch.save` zip checkpoint into plain Python containers of numpy arrays.

  Args:
    path: a `.ckpt` / `.pt` / `.pth` file written by `torch.save` (zip format, torch >= 1.6).

  Returns:
    The saved object with every tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16).

  Raises:
    UnsafePickleError: the pickle names anything but tensor storage (nothing was executed).
    diffusers.ConversionError: not a torch zip checkpoint, or a truncated one.
  """
  with open(path, 'rb') as f:
    head = f.read(len(_LEGACY_MAGIC))
  if head == _LEGACY_MAGIC:
    raise diffusers_lib.ConversionError(
        f'{path} uses the legacy (before torch 1.6) serialization, which ldm_jax does not read; '
        're-save it with a recent torch or convert it to safetensors')
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise diffusers_lib.ConversionError(f'{path} is not a readable PyTorch zip checkpoint ({e}): '
                                        'the file is truncated or is no checkpoint') from e
  with archive:
    pkls = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pkls) != 1:
      raise diffusers_lib.ConversionError(f'{path} is a zip but not a PyTorch checkpoint (no '
                                          '<archive>/data.pkl)')
    prefix = pkls[0][:-len('data.pkl')]
    try:
      with archive.open(pkls[0]) as f:
        return _Unpickler(f, archive, prefix, path).load()
    except diffusers_lib.ConversionError as e:
      if str(e).startswith(str(path)):
        raise
      raise type(e)(f'{path}: {e}') from e
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, TypeError, ValueError,
            AttributeError, IndexError, KeyError) as e:
      raise diffusers_lib.ConversionError(f'{path}: its pickle is corrupt or malformed '
                                          f'({type(e).__name__}: {e})') from e
