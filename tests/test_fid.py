"""FID/KID parity with torch-fidelity (the oracle) on random weights, and pytorch-fid's formula.

torch-fidelity's package `__init__` imports torchvision (whose wheels here are CUDA builds that do
not load with the CPU torch), so its modules are loaded from their files under a bare stand-in
package; `torch_fidelity.utils` (the torchvision-bound glue its metric modules import names from
but never call in the functions used here) is a stand-in too.
"""

import importlib
import importlib.util
import os
import pickle
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from ldm_jax.convert import ckpt
from ldm_jax.convert import inception as convert_inception
from ldm_jax.convert import tables
from ldm_jax.evaluation import fid
from ldm_jax.models import inception

torch = pytest.importorskip('torch')
_SPEC = importlib.util.find_spec('torch_fidelity')
if _SPEC is None:
  pytest.skip('torch-fidelity is not installed (make test installs it with --no-deps)',
              allow_module_level=True)

IMAGE_SHAPE = (64, 80, 3)  # non-square: the resize is checked on both axes
PER_FOLDER = 3
# The FID of the folders is compared on the 192-d features (pytorch-fid's --dims 192): with 3
# images per side the covariances are singular, and scipy's sqrtm / numpy's eigvals of a
# 2048x2048 singular product take ~100 s here; the 2048-d features are checked directly.
OUTPUTS = ('192', '2048', 'logits')


@pytest.fixture(scope='module')
def tfid():
  """torch-fidelity's Inception, TF1 resize, FID and KID modules, imported without torchvision."""
  with pytest.MonkeyPatch.context() as mp:
    package = types.ModuleType('torch_fidelity')
    package.__path__ = list(_SPEC.submodule_search_locations)
    utils = types.ModuleType('torch_fidelity.utils')
    utils.__getattr__ = lambda name: None
    mp.setitem(sys.modules, 'torch_fidelity', package)
    mp.setitem(sys.modules, 'torch_fidelity.utils', utils)
    names = ('feature_extractor_inceptionv3', 'interpolate_compat_tensorflow', 'metric_fid',
             'metric_kid')
    for name in names:
      mp.delitem(sys.modules, f'torch_fidelity.{name}', raising=False)
    mods = {n: importlib.import_module(f'torch_fidelity.{n}') for n in names}
    for name in list(sys.modules):  # leave no half-imported torch_fidelity behind
      if name.startswith('torch_fidelity.'):
        mp.delitem(sys.modules, name)
  return types.SimpleNamespace(**mods)


def _random_torch_inception(cls):
  """torch-fidelity's network with seeded random weights and batch-norm statistics."""
  torch.manual_seed(0)
  with pytest.MonkeyPatch.context() as mp:  # its constructor insists on loading a weights file
    mp.setattr(torch, 'load', lambda *a, **k: {})
    mp.setattr(cls, 'load_state_dict', lambda self, *a, **k: None)
    net = cls('inception-v3-compat', ['2048'], feature_extractor_weights_path='none')
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):  # He init keeps the activations' scale over 94 convs
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.8, 1.2)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
  return net.state_dict()


@pytest.fixture(scope='module')
def weights(tfid, tmp_path_factory):
  """The random state dict in the three file formats, and torch-fidelity's net loaded from it."""
  cls = tfid.feature_extractor_inceptionv3.FeatureExtractorInceptionV3
  state = _random_torch_inception(cls)
  folder = tmp_path_factory.mktemp('inception')
  paths = {'zip': folder / 'zip.pth', 'legacy': folder / 'pt_inception-legacy.pth',
           'safetensors': folder / 'w.safetensors'}
  torch.save(state, paths['zip'])
  torch.save(state, paths['legacy'], _use_new_zipfile_serialization=False)
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
  st_torch.save_file({k: v for k, v in state.items() if 'num_batches' not in k},
                     paths['safetensors'])
  net = cls('inception-v3-compat', list(OUTPUTS), feature_extractor_weights_path=str(
      paths['zip']))
  return types.SimpleNamespace(state=state, paths=paths, torch_net=net)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """Two folders of random PNGs (the second brighter, so the distance is not tiny)."""
  rng = np.random.default_rng(0)
  out = {}
  for name, high in (('a', 256), ('b', 200)):
    folder = tmp_path_factory.mktemp(name)
    for i in range(PER_FOLDER):
      image = rng.integers(0, high, IMAGE_SHAPE, dtype=np.uint8)
      image = image + (255 - high + 1) * (name == 'b')
      Image.fromarray(image.astype(np.uint8)).save(folder / f'{i:02d}.png')
    out[name] = folder
  return out


@pytest.fixture(scope='module')
def ours(weights, folders):
  """Our features of both folders (legacy .pth through the converter, 8-device mesh)."""
  module = inception.FIDInceptionV3(inception.InceptionConfig.fid())
  params = convert_inception.load(weights.paths['legacy'], module)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  images = [*fid.images_in(folders['a']), *fid.images_in(folders['b'])]
  done = []  # 6 images, one batch padded to the 8 devices
  got = fid.features(images, module, params, mesh, batch_size=2 * PER_FOLDER, outputs=OUTPUTS,
                     progress=done.append)
  assert done == [2 * PER_FOLDER]
  out = {'module': module, 'params': params, 'mesh': mesh}
  for name, value in zip(OUTPUTS, got):
    out[name] = {'a': value[:PER_FOLDER], 'b': value[PER_FOLDER:]}
  return out


@pytest.fixture(scope='module')
def theirs(weights, folders):
  out = {name: {} for name in OUTPUTS}
  for folder_name, folder in folders.items():
    images = np.stack(list(fid.images_in(folder)))
    with torch.no_grad():
      got = weights.torch_net(torch.from_numpy(images).permute(0, 3, 1, 2))
    for name, value in zip(OUTPUTS, got):
      out[name][folder_name] = value
  return out


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('output', OUTPUTS)
def test_features_match_torch_fidelity(ours, theirs, output):
  for folder in ('a', 'b'):
    got, ref = ours[output][folder], theirs[output][folder].numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.std(ref) > 1e-2  # the random network does not collapse
    assert _rel(got, ref) <= 1e-4, _rel(got, ref)
  assert ours['2048']['a'].shape == (PER_FOLDER, inception.FEATURE_DIM)


def test_fid_of_two_folders_matches_torch_fidelity(tfid, ours, theirs):
  m, dims = tfid.metric_fid, '192'
  ref = m.fid_statistics_to_metric(m.fid_features_to_statistics(theirs[dims]['a']),
                                   m.fid_features_to_statistics(theirs[dims]['b']), False)
  ref = ref[m.KEY_METRIC_FID]
  value = fid.frechet_distance(*fid.statistics(ours[dims]['a']),
                               *fid.statistics(ours[dims]['b']))
  assert ref > 1e-3
  assert abs(value - ref) <= 1e-3 * abs(ref), (value, ref)


def test_kid_matches_torch_fidelity(tfid, ours):
  kw = dict(kid_subsets=20, kid_subset_size=2, verbose=False)
  f1, f2 = (ours['2048'][k].astype(np.float64) for k in 'ab')
  ref = tfid.metric_kid.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), **kw)
  mean, std = fid.kid(f1, f2, subsets=20, subset_size=2)
  np.testing.assert_allclose([mean, std], [ref['kernel_inception_distance_mean'],
                                           ref['kernel_inception_distance_std']], rtol=1e-9)
  # A larger draw with the defaults' subset logic, on features with a known offset.
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(60, 16)), rng.normal(0.3, 1.0, size=(50, 16))
  ref = tfid.metric_kid.kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y),
                                                kid_subsets=30, kid_subset_size=40, verbose=False)
  np.testing.assert_allclose(fid.kid(x, y, subsets=30, subset_size=40),
                             [ref['kernel_inception_distance_mean'],
                              ref['kernel_inception_distance_std']], rtol=1e-9)
  with pytest.raises(ValueError, match='subset_size=1000'):
    fid.kid(x, y)


@pytest.mark.parametrize('shape', [(37, 50), (400, 333), (299, 299)])
def test_tf1_resize_matches_torch_fidelity(tfid, shape):
  x = np.random.default_rng(0).uniform(0, 255, (2, 3, *shape)).astype(np.float32)
  ref = tfid.interpolate_compat_tensorflow.interpolate_bilinear_2d_like_tensorflow1x(
      torch.from_numpy(x), size=(299, 299), align_corners=False).numpy()
  got = np.asarray(fid.resize_tf1(np.transpose(x, (0, 2, 3, 1))))
  np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), ref, atol=1e-4, rtol=0)


def _pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's calculate_frechet_distance, from its definition (without the print)."""
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_npz_stats_from_numpy_give_pytorch_fids_distance(tfid, tmp_path):
  rng = np.random.default_rng(0)
  stats = []
  for i in range(2):
    a = rng.normal(size=(64, 32))
    stats.append((rng.normal(size=32), a.T @ a / 64))
    np.savez(tmp_path / f's{i}.npz', mu=stats[-1][0], sigma=stats[-1][1])
  (mu1, s1), (mu2, s2) = [fid.load_stats(tmp_path / f's{i}.npz') for i in range(2)]
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  assert value == pytest.approx(_pytorch_fid_reference(*stats[0], *stats[1]), rel=1e-12)
  m = tfid.metric_fid  # torch-fidelity's eigenvalue formula agrees on full-rank statistics
  ref = m.fid_statistics_to_metric({'mu': mu1, 'sigma': s1}, {'mu': mu2, 'sigma': s2}, False)
  assert value == pytest.approx(ref[m.KEY_METRIC_FID], rel=1e-9)
  fid.save_stats(tmp_path / 'ours.npz', mu1, s1)  # and ours reads back as pytorch-fid reads it
  with np.load(tmp_path / 'ours.npz') as f:
    np.testing.assert_array_equal(f['mu'], mu1)
    np.testing.assert_array_equal(f['sigma'], s1)


def test_features_take_uint8_images(ours):
  with pytest.raises(ValueError, match='uint8 RGB images'):
    fid.features([np.zeros((8, 8, 3), np.float32)], ours['module'], ours['params'], ours['mesh'])


def test_stats_errors(tmp_path):
  np.savez(tmp_path / 'bad.npz', mean=np.zeros(3))
  with pytest.raises(ValueError, match=r"holds \['mean'\], not \['mu', 'sigma'\]"):
    fid.load_stats(tmp_path / 'bad.npz')
  with pytest.raises(ValueError, match='Imaginary component'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match='at least two images'):
    fid.statistics(np.zeros((1, 8)))


def test_weight_formats_load_alike(weights, ours):
  legacy = convert_inception.read_state_dict(weights.paths['legacy'])
  zipped = convert_inception.read_state_dict(weights.paths['zip'])
  st = convert_inception.read_state_dict(weights.paths['safetensors'])
  assert sorted(legacy) == sorted(zipped) == sorted(weights.state)
  for k, v in weights.state.items():
    np.testing.assert_array_equal(legacy[k], v.numpy())
    np.testing.assert_array_equal(zipped[k], v.numpy())
    if 'num_batches' not in k:
      np.testing.assert_array_equal(st[k], v.numpy())
  params = convert_inception.load(weights.paths['safetensors'], ours['module'])
  jax.tree.map(np.testing.assert_array_equal, params, ours['params'])


def test_converter_lists_every_bad_key(weights, ours):
  state = {k: v.numpy() for k, v in weights.state.items()}
  del state['Mixed_6b.branch7x7_2.conv.weight']
  state['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
  state['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(tables.WeightsMismatchError) as e:
    convert_inception.to_flax(state, inception.abstract_params(ours['module']))
  msg = str(e.value)
  for line in ('1 missing:', 'Mixed_6b.branch7x7_2.conv.weight', '1 unexpected:',
               'AuxLogits.fc.weight', '1 mis-shaped:', 'fc.weight: file has (1000, 2048)'):
    assert line in msg, msg


def test_legacy_pickle_that_runs_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))

  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    for header in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
      pickle.dump(header, f, protocol=2)
    pickle.dump({'w': Evil()}, f, protocol=2)
  with pytest.raises(ckpt.UnsafePickleError, match='os|posix'):
    convert_inception.read_state_dict(path)


def test_pil_bicubic_resize():
  flat = np.full((40, 30, 3), 77, np.uint8)
  out = fid.resize_pil_bicubic(flat)
  assert out.shape == (299, 299, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 77, atol=1e-3)
  noisy = fid.resize_pil_bicubic(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8))
  assert noisy.min() >= 0 and noisy.max() <= 255  # bicubic overshoot is clipped, as clean-fid
  with pytest.raises(ValueError, match='already resized to 299x299'):
    fid.preprocess(np.zeros((1, 40, 30, 3), np.uint8), resize='pil_bicubic')


def test_commands_ref_stats_fid_and_kid(weights, folders, ours, tmp_path, capsys):
  """`python -m ldm_jax.evaluation ref-stats` then `fid` (statistics, and folders with KID):
  the numbers of the library on the same features (192-d: fast singular square roots)."""
  from ldm_jax.evaluation import __main__ as command  # pylint: disable=g-import-not-at-top
  common = ['--inception', str(weights.paths['safetensors']), '--dims', '192', '--batch_size', '8']
  stats = tmp_path / 'b.npz'
  command.main(['ref-stats', '--images', str(folders['b']), '--out', str(stats), *common])
  mu, sigma = fid.load_stats(stats)
  want_mu, want_sigma = fid.statistics(ours['192']['b'])
  np.testing.assert_allclose(mu, want_mu, rtol=1e-5, atol=1e-6)
  want = fid.frechet_distance(*fid.statistics(ours['192']['a']), want_mu, want_sigma)
  command.main(['fid', '--samples', str(folders['a']), '--ref', str(stats), *common])
  command.main(['fid', '--samples', str(folders['a']), '--ref', str(folders['b']), '--kid',
                '--kid_subsets', '5', '--kid_subset_size', '2', *common])
  out = capsys.readouterr().out
  fids = [float(line.split()[1]) for line in out.splitlines() if line.startswith('FID')]
  assert len(fids) == 2 and all(abs(f - want) <= 1e-3 * want for f in fids), (fids, want)
  assert 'KID' in out
  with pytest.raises(SystemExit, match='--kid needs reference images'):
    command.main(['fid', '--samples', str(folders['a']), '--ref', str(stats), '--kid', *common])


class _SamplingStage:
  """A stage that 'samples' fixed images: the evaluator's wiring without a diffusion model."""
  name, samples, frozen = 'fake', True, {}

  def __init__(self, images):
    self.images = np.stack(images)

  def sample(self, ema_params, frozen, prompts, mesh, settings):
    del ema_params, frozen, mesh, settings
    return self.images[:len(prompts)]


def test_in_training_evaluation_logs_fid(weights, folders, ours, tmp_path, monkeypatch):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  real = fid.features  # 192-d features: the evaluator's wiring, with fast square roots
  monkeypatch.setattr(fid, 'features', lambda *a, **k: real(*a, **k, outputs='192'))
  stats = tmp_path / 'b.npz'
  fid.save_stats(stats, *fid.statistics(ours['192']['b']))
  config = ml_collections.ConfigDict({'eval': dict(
      every=1, metrics='fid', prompts_file='', num_images=PER_FOLDER, batch_size=8, steps=1,
      sampler='ddim', guidance=1.0, seed=0, target='fid<=1', fid_stats=str(stats),
      inception=str(weights.paths['zip']), clip=''), 'data': {}})
  images = list(fid.images_in(folders['a']))
  with open(tmp_path / 'prompts.txt', 'w') as f:
    f.write('a\nb\nc\n')
  config.eval.prompts_file = str(tmp_path / 'prompts.txt')
  evaluator = evaluate.Evaluator(_SamplingStage(images), config, str(tmp_path), ours['mesh'])
  values, grid = evaluator.evaluate({}, {}, 7)
  want = fid.frechet_distance(*fid.statistics(ours['192']['a']), *fid.statistics(ours['192']['b']))
  assert values['eval/fid'] == pytest.approx(want, rel=1e-3)
  assert grid.ndim == 3 and (tmp_path / 'eval' / 'step_000007.png').is_file()
  assert evaluate.target_report(config.eval.target, values).endswith('not yet')
