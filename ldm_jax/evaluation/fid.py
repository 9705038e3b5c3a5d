"""FID and KID as the published numbers compute them: Inception features, statistics, distances.

The pipeline is torch-fidelity's (which torchmetrics' FID calls), with pytorch-fid's statistics
files and Fréchet distance:

    images (uint8) -> resize to 299 -> (x - 128) / 128 -> FID Inception pool_3 (2048-d)
      -> mu, sigma (float64) -> ||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2))

Statistics files are pytorch-fid's `.npz` (`mu`, `sigma`), so reference statistics computed by
pytorch-fid, clean-fid or torch-fidelity load directly. The network runs batched and jitted,
sharded over all devices of the mesh.
"""

import functools
import logging
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import linalg

from ldm_jax.models import inception

P = jax.sharding.PartitionSpec

# 'tf1': torch-fidelity's bilinear resize, bit-compatible with TensorFlow 1.x's
# `tf.image.resize_bilinear` that the original TF FID code used (the default, see `preprocess`).
# 'pil_bicubic': clean-fid's "clean" mode, PIL's antialiased bicubic on float pixels.
RESIZES = ('tf1', 'pil_bicubic')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def _tf1_grid(in_size, out_size):
  """Source indices and weights of TF1's bilinear resize (align_corners=False, no half-pixel)."""
  # float32 throughout, as torch-fidelity computes them: the product rounds identically.
  src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lo = src.astype(np.int64)  # truncation; src >= 0
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, src - lo.astype(np.float32)


def resize_tf1(x, size=inception.INPUT_SIZE):
  """torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (method 'slow'), NHWC.

  Args:
    x: (B, H, W, C) float32 pixels.
    size: the output side.

  Returns:
    (B, size, size, C) float32. TF1's bilinear samples source pixel i * in/out with no
    half-pixel offset and no antialiasing, so downscaling aliases; the published FIDs
    were computed that way.
  """
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x  # the interpolation is then exactly the identity
  x = x.astype(jnp.float32)
  ylo, yhi, dy = _tf1_grid(h, size)
  xlo, xhi, dx = _tf1_grid(w, size)
  rows_lo, rows_hi = x[:, ylo], x[:, yhi]  # (B, size, W, C)
  dx = dx[None, None, :, None]
  # The same operations in the same order as the reference, so float32 rounds alike.
  top = rows_lo[:, :, xlo] + (rows_lo[:, :, xhi] - rows_lo[:, :, xlo]) * dx
  bottom = rows_hi[:, :, xlo] + (rows_hi[:, :, xhi] - rows_hi[:, :, xlo]) * dx
  return top + (bottom - top) * dy[None, :, None, None]


def resize_pil_bicubic(image, size=inception.INPUT_SIZE):
  """clean-fid's "clean" resize of one (H, W, 3) uint8 image: PIL bicubic per float channel.

  Resizing float pixels (mode 'F') without quantising back to uint8, with PIL's antialiasing
  filter, is what clean-fid recommends (Parmar et al. 2022); its FIDs differ from the TF1 ones.

  Returns:
    (size, size, 3) float32 in [0, 255].
  """
  channels = []
  for i in range(image.shape[-1]):
    img = Image.fromarray(np.ascontiguousarray(image[..., i], np.float32))  # mode 'F'
    img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    channels.append(np.asarray(img).clip(0, 255))
  return np.stack(channels, axis=-1).astype(np.float32)


def preprocess(images, resize='tf1'):
  """uint8 (or float [0, 255]) NHWC pixels -> the network's (B, 299, 299, 3) input in [-1, 1].

  The default resize is torch-fidelity's TF1-style bilinear, because that is what the published
  FID numbers use: the original TensorFlow FID code (TTUR) resized inside the TF graph with
  `resize_bilinear`, torch-fidelity reproduces it bit-exactly, and torchmetrics' FID runs
  torch-fidelity's network and resize. pytorch-fid's own torchvision resize differs slightly.
  With resize='pil_bicubic' the images must already be 299x299 (`features` resizes them on the
  host); the scaling is then the same.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  if resize == 'tf1':
    x = resize_tf1(x)
  elif x.shape[1:3] != (inception.INPUT_SIZE,) * 2:
    raise ValueError(f'resize={resize!r} takes images already resized to 299x299, got '
                     f'{x.shape[1]}x{x.shape[2]}')
  return (x - 128) / 128


@functools.lru_cache(maxsize=16)
def _feature_fn(module, mesh, resize, outputs):
  """The jitted preprocess + network, batch sharded over every axis of the mesh."""
  batch = jax.sharding.NamedSharding(mesh, P(tuple(mesh.axis_names)))
  replicated = jax.sharding.NamedSharding(mesh, P())

  def run(params, images):
    return module.apply({'params': params}, preprocess(images, resize), outputs=outputs)

  return jax.jit(run, in_shardings=(replicated, batch), out_shardings=replicated), replicated, batch


def _batches(images, batch_size, resize):
  """(padded batch, number of real images): consecutive images of one size, zero-padded."""
  pending = []
  for image in images:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f'an image of shape {image.shape} and dtype {image.dtype}: features() takes '
                       '(H, W, 3) uint8 RGB images, as they are saved (from [-1, 1] floats: '
                       '`np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)`)')
    if resize == 'pil_bicubic':
      image = resize_pil_bicubic(image)
    if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
      yield _pad(pending, batch_size), len(pending)
      pending = []
    pending.append(image)
  if pending:
    yield _pad(pending, batch_size), len(pending)


def _pad(images, batch_size):
  out = np.zeros((batch_size,) + images[0].shape, images[0].dtype)
  out[:len(images)] = images
  return out


def features(images, module, params, mesh, *, batch_size=64, resize='tf1', outputs='2048',
             progress=None):
  """Inception pool_3 features of a stream of images.

  Args:
    images: an iterable of (H, W, 3) uint8 RGB images (`images_in(folder)`); consecutive images
      of one size share a batch, so same-sized images compile once.
    module: the `inception.FIDInceptionV3`.
    params: its parameters (`ldm_jax.convert.inception.load`).
    mesh: the `jax.sharding.Mesh` whose devices share each batch (all of its axes).
    batch_size: images per step, rounded up to a multiple of the mesh's device count; the last
      batch is zero-padded to it (one compiled shape) and the padding dropped.
    resize: 'tf1' (default, on the device) or 'pil_bicubic' (clean-fid, on the host); see
      `preprocess`.
    outputs: '2048' (the FID's pool_3 features), another of `inception.OUTPUTS` ('64', '192',
      '768', 'logits'), or a tuple of them (then a tuple is returned).
    progress: optional callable, called with the number of images done after each batch.

  Returns:
    (N, 2048) float32 numpy features (or what `outputs` names), in the order of `images`.
    One process: the mesh may span all its local devices.
  """
  if resize not in RESIZES:
    raise ValueError(f'resize={resize!r} is not one of {RESIZES}')
  n_dev = mesh.devices.size
  batch_size = -(-max(batch_size, 1) // n_dev) * n_dev
  outputs = outputs if isinstance(outputs, str) else tuple(outputs)
  fn, replicated, batch_sharding = _feature_fn(module, mesh, resize, outputs)
  params = jax.device_put(params, replicated)
  outs, done, last = [], 0, None
  for batch, n in _batches(images, batch_size, resize):
    result = fn(params, jax.device_put(batch, batch_sharding))  # dispatched asynchronously
    if last is not None:  # read the previous batch back while this one runs
      outs.append(jax.tree.map(lambda a, k=last[1]: np.asarray(a)[:k], last[0]))
    last, done = (result, n), done + n
    if progress is not None:
      progress(done)
  if last is None:
    raise ValueError('features() got no images: the folder or iterator is empty')
  outs.append(jax.tree.map(lambda a: np.asarray(a)[:last[1]], last[0]))
  if isinstance(outputs, str):
    return np.concatenate(outs)
  return tuple(np.concatenate(parts) for parts in zip(*outs))


def images_in(folder):
  """Yields the PNG/JPEG images of a folder (not its subfolders) as (H, W, 3) uint8, sorted."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f'image folder {folder} does not exist')
  paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
  if not paths:
    raise FileNotFoundError(f'{folder} holds no {"/".join(IMAGE_EXTENSIONS)} images')
  for path in paths:
    with Image.open(path) as img:
      yield np.asarray(img.convert('RGB'))


def statistics(feats):
  """(mu, sigma) in float64, as pytorch-fid: the mean and `np.cov(rowvar=False)` of the rows."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f'statistics() needs (N >= 2, D) features, got shape {feats.shape}: a '
                     'covariance needs at least two images (an FID wants thousands)')
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def save_stats(path, mu, sigma):
  """Writes pytorch-fid's `.npz` layout: arrays `mu` (D,) and `sigma` (D, D)."""
  mu, sigma = _check_stats(np.asarray(mu), np.asarray(sigma), path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to other names
    np.savez(f, mu=mu, sigma=sigma)


def load_stats(path):
  """(mu, sigma) float64 from a pytorch-fid / clean-fid / torch-fidelity `.npz` statistics file."""
  with np.load(path) as f:
    missing = [k for k in ('mu', 'sigma') if k not in f.files]
    if missing:
      raise ValueError(f'{path} holds {sorted(f.files)}, not {missing}: a statistics file has '
                       "arrays 'mu' and 'sigma' (pytorch-fid's layout, as save_stats() writes)")
    return _check_stats(f['mu'], f['sigma'], path)


def _check_stats(mu, sigma, where):
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f'{where}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)')
  return mu.astype(np.float64), sigma.astype(np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), with scipy's sqrtm; if
  that is not finite, `eps` is added to both diagonals and it is taken again; an imaginary part
  (from numerical error) is dropped when the diagonal's is within 1e-3 of 0.

  Raises:
    ValueError: mismatched shapes, or a large imaginary component (the covariances are not
      positive semi-definite).
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma '
                     f'{sigma1.shape} vs {sigma2.shape} (same network layer on both sides?)')
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning('fid calculation produces singular product; adding %s to diagonal of cov '
                    'estimates', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'Imaginary component {np.max(np.abs(covmean.imag))}: the covariances '
                       'are not positive semi-definite (corrupt statistics?)')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a):
  # pytorch-fid calls sqrtm(..., disp=False), which only silences scipy's accuracy warning
  # (`disp` is deprecated since scipy 1.16); the square root is the same.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    return linalg.sqrtm(a)


def kid(feats1, feats2, *, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1.0,
        seed=2020):
  """Kernel Inception Distance: torch-fidelity's unbiased polynomial-kernel MMD^2 over subsets.

  Each of `subsets` rounds draws `subset_size` rows of each side without replacement (numpy
  RandomState(seed), in torch-fidelity's order, so its defaults give its numbers) and takes the
  unbiased MMD^2 with k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D by default. Computed in
  float64 (torch-fidelity keeps the features' float32, which loses digits to cancellation).

  Returns:
    (mean, std) over the subsets.
  """
  f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f'kid() takes (N, D) features with the same D, got {f1.shape}, {f2.shape}')
  if min(len(f1), len(f2)) < max(subset_size, 2):
    raise ValueError(f'KID subset_size={subset_size} needs at least that many (and >= 2) '
                     f'images per side, got {len(f1)} and {len(f2)}: pass a smaller subset_size')
  gamma = 1.0 / f1.shape[1] if gamma is None else gamma
  kernel = lambda x, y: (x @ y.T * gamma + coef0) ** degree
  rng = np.random.RandomState(seed)
  mmds = np.zeros(subsets)
  for i in range(subsets):
    x = f1[rng.choice(len(f1), subset_size, replace=False)]
    y = f2[rng.choice(len(f2), subset_size, replace=False)]
    mmds[i] = _mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
  return float(np.mean(mmds)), float(np.std(mmds))


def _mmd2_unbiased(k_xx, k_xy, k_yy):
  """The unbiased MMD^2 estimate: off-diagonal means of K_XX and K_YY minus twice K_XY's mean."""
  m = k_xx.shape[0]
  xx = k_xx.sum() - np.trace(k_xx)
  yy = k_yy.sum() - np.trace(k_yy)
  return (xx + yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)
