"""Evaluate samples: `python -m ldm_jax.evaluation fid | clip-score | ref-stats | shapes` (--help).

  fid         --samples DIR --ref DIR_OR_NPZ --inception FILE [--kid] [--resize pil_bicubic]
  clip-score  --samples DIR --clip FOLDER_OR_FILE  (prompts from DIR/samples.jsonl)
  ref-stats   (--images DIR | --data NAME [--data_dir D] [--resolution R] [--num N])
              --inception FILE --out stats.npz
  shapes      --samples DIR  (prompt fidelity of shapes samples)

A samples folder is what sample.py writes (PNGs and samples.jsonl), or any folder of images (FID
only). Features and embeddings are computed in jitted batches split over all local devices.
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy as np


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m ldm_jax.evaluation', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  f = sub.add_parser('fid', help='FID (and KID) of a samples folder against reference images '
                     'or statistics')
  f.add_argument('--samples', required=True)
  f.add_argument('--ref', required=True, help='a folder of images, or a .npz of mu and sigma '
                 '(pytorch-fid / clean-fid / ref-stats)')
  _inception_flags(f)
  f.add_argument('--kid', action='store_true', help='also KID (needs reference images)')
  f.add_argument('--kid_subsets', type=int, default=100)
  f.add_argument('--kid_subset_size', type=int, default=1000, help="torch-fidelity's default; "
                 'at most the number of images per side')
  c = sub.add_parser('clip-score', help='CLIP score of samples with their prompts')
  c.add_argument('--samples', required=True, help='a sample.py folder (samples.jsonl)')
  c.add_argument('--clip', required=True, help='a transformers CLIPModel folder or an '
                 'open_clip checkpoint')
  c.add_argument('--batch_size', type=int, default=64)
  r = sub.add_parser('ref-stats', help='reference statistics (.npz) for FID')
  src = r.add_mutually_exclusive_group(required=True)
  src.add_argument('--images', help='a folder of images')
  src.add_argument('--data', help='a dataset name, as data.name takes it')
  r.add_argument('--data_dir', default='data')
  r.add_argument('--image_key', default='image')
  r.add_argument('--resolution', type=int, default=512, help='--data: center crops of this size')
  r.add_argument('--num', type=int, default=0, help='--data: the first N records (0: all)')
  r.add_argument('--out', required=True)
  _inception_flags(r)
  s = sub.add_parser('shapes', help='prompt fidelity of shapes samples')
  s.add_argument('--samples', required=True)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  try:
    {'fid': _fid, 'clip-score': _clip_score, 'ref-stats': _ref_stats,
     'shapes': _shapes}[args.command](args)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')


def _inception_flags(parser):
  parser.add_argument('--inception', required=True, help='the FID Inception weights '
                      '(pt_inception-2015-12-05-6726825d.pth, or safetensors)')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--resize', default='tf1', choices=('tf1', 'pil_bicubic'),
                      help="tf1: torch-fidelity's (the published numbers); pil_bicubic: "
                           "clean-fid's")
  parser.add_argument('--dims', default='2048', choices=('64', '192', '768', '2048'),
                      help="the Inception features (pytorch-fid's --dims); 2048: the FID's")


def _fid(args):
  from ldm_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  feats = _features(args, _sample_images(args.samples), 'samples')
  if args.ref.endswith('.npz'):
    if args.kid:
      raise ValueError('--kid needs reference images (--ref DIR), not statistics')
    mu, sigma = fid.load_stats(args.ref)
  else:
    ref = _features(args, fid.images_in(args.ref), 'reference')
    mu, sigma = fid.statistics(ref)
  print(f'FID {fid.frechet_distance(*fid.statistics(feats), mu, sigma):.4f} '
        f'({len(feats)} samples)')
  if args.kid:
    mean, std = fid.kid(feats, ref, subsets=args.kid_subsets, subset_size=args.kid_subset_size)
    print(f'KID {mean:.6f} +- {std:.6f}')


def _clip_score(args):
  from ldm_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  records = _records(args.samples)
  images = [_load(args.samples, r['file']) for r in records]
  scorer = clip_score.CLIPScorer.from_path(args.clip, batch_size=args.batch_size)
  scores = scorer.evaluate(images, [r['prompt'] for r in records])
  print(f'CLIP score {scores["clip_score"]:.4f} (torchmetrics: 100 x cosine, clipped at 0); '
        f'mean cosine {scores["clip_cosine"]:.4f} (MLPerf); {len(images)} images')


def _ref_stats(args):
  from ldm_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  images = (fid.images_in(args.images) if args.images else
            _dataset_images(args.data, args.data_dir, args.image_key, args.resolution, args.num))
  feats = _features(args, images, 'reference')
  fid.save_stats(args.out, *fid.statistics(feats))
  print(f'wrote {args.out}: mu and sigma of {len(feats)} images')


def _shapes(args):
  from ldm_jax.evaluation import shapes  # pylint: disable=g-import-not-at-top
  shapes.main(['--samples', args.samples])


def _features(args, images, what):
  """Inception features of `images`, with a progress line."""
  # pylint: disable=g-import-not-at-top
  from ldm_jax import sharding
  from ldm_jax.convert import inception as convert_inception
  from ldm_jax.evaluation import fid
  from ldm_jax.models import inception
  module = inception.FIDInceptionV3(inception.InceptionConfig.fid())
  params = convert_inception.load(args.inception, module)
  start = time.perf_counter()

  def progress(done):
    rate = done / max(time.perf_counter() - start, 1e-9)
    print(f'\r{what}: {done} images, {rate:.1f} images/s', end='', file=sys.stderr, flush=True)

  feats = fid.features(images, module, params, sharding.make_mesh((('data', -1),)),
                       batch_size=args.batch_size, resize=args.resize, outputs=args.dims,
                       progress=progress)
  print(file=sys.stderr)
  return feats


def _records(folder):
  path = os.path.join(folder, 'samples.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: a samples folder is what sample.py writes '
                            '(PNGs and samples.jsonl, one {"file", "prompt"} per image)')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _load(folder, name):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(os.path.join(folder, name)) as img:
    return np.asarray(img.convert('RGB'))


def _sample_images(folder):
  """A samples folder's images: those samples.jsonl lists, else every image in it."""
  from ldm_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  if os.path.isfile(os.path.join(folder, 'samples.jsonl')):
    return (_load(folder, r['file']) for r in _records(folder))
  return fid.images_in(folder)


def _dataset_images(name, data_dir, image_key, resolution, num):
  """Center crops of a dataset's images (undecodable ones skipped and counted)."""
  # pylint: disable=g-import-not-at-top
  from ldm_jax.data import images as images_lib
  from ldm_jax.data import sources
  source = sources.data_source(name, 'train', data_dir, image_key=image_key)
  bad = 0
  for i in range(min(num, len(source)) if num else len(source)):
    try:
      img, _ = images_lib.decode_for(source[i][image_key], resolution, resolution)
    except images_lib.DECODE_ERRORS:
      bad += 1
      continue
    img, _, _ = images_lib.fit(img, resolution, resolution, 'center', None)
    yield np.asarray(img)
  if bad:
    logging.warning('%d images of %s did not decode and were skipped', bad, name)


if __name__ == '__main__':
  main()
