"""In-training evaluation (`config.eval`): every `eval.every` steps the EMA weights sample a fixed
prompt set and the chosen metrics are computed, logged to metrics.jsonl and TensorBoard (with the
sample grid, also written to `<workdir>/eval/step_XXXXXX.png`).

Metrics (`eval.metrics`, comma-separated):
  shapes: prompt fidelity read back from the pixels (the shapes dataset's configs; the demo's
    number), on training and held-out colour/shape combinations.
  fid: FID of the samples against `eval.fid_stats` (a pytorch-fid / clean-fid `.npz` of `mu`,
    `sigma`), with the FID Inception weights `eval.inception`.
  clip: CLIP score (100 x cosine, clipped at 0, as torchmetrics) of each sample with its prompt,
    with the transformers CLIPModel folder (or open_clip checkpoint) `eval.clip`.
A metric whose weights or statistics are not given is left out with a warning when the run
starts, never a crash. Sampling runs on process 0's devices (the previews' pipeline).
"""

import logging
import os
import re

from PIL import Image

from ldm_jax import distributed
from ldm_jax.convert import inception as convert_inception
from ldm_jax.data import pipeline
from ldm_jax.data import sources
from ldm_jax.evaluation import clip_score
from ldm_jax.evaluation import fid
from ldm_jax.evaluation import shapes as shapes_eval
from ldm_jax.models import inception
from ldm_jax.sampling import outputs
from ldm_jax.sampling import run
from ldm_jax.train import export

METRICS = ('shapes', 'fid', 'clip')


def metric_names(eval_config):
  """The metrics `eval.metrics` names, in order, or ValueError naming the unknown ones."""
  names = [m.strip() for m in str(eval_config.metrics).split(',') if m.strip()]
  unknown = [m for m in names if m not in METRICS]
  if unknown:
    raise ValueError(f'eval.metrics={eval_config.metrics!r}: unknown {unknown}; it takes a '
                     f'comma-separated list of {", ".join(METRICS)}')
  return names


def prompts(eval_config, data_config):
  """The evaluation prompts: `eval.prompts_file` (one per line), else for shapes every
  colour/shape combination, else the first `eval.num_images` captions of the training data."""
  if eval_config.prompts_file:
    lines = run.read_prompts(prompts_file=eval_config.prompts_file)
    if not lines:
      raise ValueError(f'eval.prompts_file {eval_config.prompts_file!r} holds no prompt')
  elif 'shapes' in metric_names(eval_config):
    lines = shapes_eval.demo_prompts()
  else:
    source = sources.data_source(data_config.name, data_config.split, data_config.data_dir,
                                 image_key=data_config.image_key,
                                 caption_key=data_config.caption_key)
    lines = [pipeline.as_text(source[i][data_config.caption_key])
             for i in range(min(len(source), eval_config.num_images))]
  n = eval_config.num_images or len(lines)
  return (lines * -(-n // len(lines)))[:n]


class Evaluator:
  """Samples the evaluation prompts from the EMA weights and computes the metrics.

  Args:
    stage: the training stage (it must sample: `stage.sample`).
    config: the whole training config (`eval`, `data`).
    workdir: where `eval/step_XXXXXX.png` grids go.
    mesh: the run's mesh (process 0 samples on its own devices).
  """

  def __init__(self, stage, config, workdir, mesh):
    self.stage, self.config = stage, config
    self.every = int(config.eval.every)
    self.folder = os.path.join(workdir, 'eval')
    self.mesh = export.sampling_mesh(mesh)
    self.metrics = _usable(config.eval, metric_names(config.eval)) if self.every else []
    if self.metrics and not stage.samples:
      logging.warning('eval: the %s stage does not sample images: eval.every is ignored (it is '
                      'for the ldm stage)', stage.name)
      self.metrics = []
    self.prompts = prompts(config.eval, config.data) if self.metrics else []
    self._scorers = {}

  def due(self, step, last):
    return bool(self.metrics) and (step % self.every == 0 or last)

  def evaluate(self, ema_params, frozen, step):
    """Every process calls this (the EMA weights are gathered); process 0 samples and scores.

    Returns:
      On process 0 ({'eval/<metric>': value, ...}, the sample grid: uint8 (H, W, 3)), else None.
    """
    ema_params = distributed.to_host(ema_params)
    frozen = export.host_frozen(self.stage, frozen)
    if not distributed.is_main():
      return None
    e = self.config.eval
    images = self.stage.sample(ema_params, frozen, self.prompts, self.mesh, e)
    values = {}
    for name in list(self.metrics):
      try:
        values |= self._score(name, images)
      except (OSError, ValueError) as e:  # unreadable weights or statistics: train on without
        logging.warning('eval: %s failed and is left out from now on: %s', name, e)
        self.metrics.remove(name)
    os.makedirs(self.folder, exist_ok=True)
    grid = outputs.make_grid(images[:64])
    Image.fromarray(grid).save(os.path.join(self.folder, f'step_{step:06d}.png'))
    logging.info('evaluation at step %d (%d images): %s%s', step, len(images),
                 ', '.join(f'{k} {v:.4g}' for k, v in values.items()),
                 target_report(e.get('target', ''), values))
    return values, grid

  def _score(self, name, images):
    if name == 'shapes':
      return {f'eval/shapes_fidelity_{group}': score['both'] for group, score in
              shapes_eval.fidelity_by_group(images, self.prompts).items()}
    if name == 'fid':
      if 'fid' not in self._scorers:  # loaded once, at the first evaluation
        module = inception.FIDInceptionV3(inception.InceptionConfig.fid())
        self._scorers['fid'] = (module, convert_inception.load(self.config.eval.inception, module),
                                fid.load_stats(self.config.eval.fid_stats))
      module, params, (mu, sigma) = self._scorers['fid']
      feats = fid.features(images, module, params, self.mesh,
                           batch_size=self.config.eval.batch_size)
      return {'eval/fid': fid.frechet_distance(*fid.statistics(feats), mu, sigma)}
    if name == 'clip':
      if 'clip' not in self._scorers:  # loaded once, at the first evaluation
        self._scorers['clip'] = clip_score.CLIPScorer.from_path(
            self.config.eval.clip, batch_size=self.config.eval.batch_size, mesh=self.mesh)
      scores = self._scorers['clip'].evaluate(images, self.prompts)
      return {'eval/clip_score': scores['clip_score'], 'eval/clip_cosine': scores['clip_cosine']}
    raise NotImplementedError(name)


def parse_target(spec):
  """[(metric, '<=' or '>=', value)] of a target like 'fid<=90,clip_cosine>=0.15'.

  Raises:
    ValueError: a part is not <metric><=<number> or <metric>>=<number>.
  """
  out = []
  for part in (p.strip() for p in (spec or '').split(',') if p.strip()):
    m = re.fullmatch(r'([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)', part)
    if m is None:
      raise ValueError(f'eval.target {spec!r}: {part!r} is not <metric><=<number> or '
                       '<metric>>=<number> (e.g. fid<=90,clip_cosine>=0.15)')
    out.append((m.group(1), m.group(2), float(m.group(3))))
  return out


def target_report(spec, values):
  """'; target fid<=90: 85.2 met, ...' for the metrics of `spec` that were measured."""
  parts = []
  for metric, op, bound in parse_target(spec):
    value = values.get(f'eval/{metric}')
    if value is not None:
      met = value <= bound if op == '<=' else value >= bound
      parts.append(f'{metric}{op}{bound:g}: {value:.4g} {"met" if met else "not yet"}')
  return '; target ' + ', '.join(parts) if parts else ''


def _usable(eval_config, names):
  """The metrics whose weights are given; the others are named in a warning."""
  need = {'fid': ('inception', 'fid_stats'), 'clip': ('clip',)}
  usable = []
  for name in names:
    missing = [k for k in need.get(name, ()) if not eval_config.get(k)]
    absent = [f'{k}={eval_config.get(k)!r}' for k in need.get(name, ())
              if eval_config.get(k) and not os.path.exists(eval_config.get(k))]
    if missing or absent:
      logging.warning('eval: %s is left out: %s', name,
                      f'set eval.{" and eval.".join(missing)}' if missing
                      else f'{", ".join(absent)} does not exist')
    else:
      usable.append(name)
  return usable
