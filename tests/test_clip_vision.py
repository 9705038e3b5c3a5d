"""The CLIP image tower, whole CLIP models (transformers and open_clip layouts) and the CLIP score,
against transformers' CLIPModel on tiny random weights, float32.

Tolerance: max |ours - ref| <= 1e-4 * max |ref| (torch_reference.rel_err).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

import torch_reference as tr
from ldm_jax.convert import clip as convert_clip
from ldm_jax.convert import tables
from ldm_jax.evaluation import clip_score
from ldm_jax.models import image_encoder

torch, transformers = tr.torch, tr.transformers
RTOL = 1e-4
TEXT = dict(tr.TINY_TEXT, num_hidden_layers=2)  # eos_token_id 2: pooled at argmax(ids)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
PROJECTION = 24
PROMPTS = ['a red circle', 'two blue squares', 'green', 'a big yellow triangle on grey',
           'x', 'purple', 'orange star', 'a', 'the end', 'one more', 'eleven prompts']


def _reference(act):
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=dict(TEXT, hidden_act=act),
                                   vision_config=dict(VISION, hidden_act=act),
                                   projection_dim=PROJECTION)
  return tr.perturb(transformers.CLIPModel(config))


_SAVED = {}


def _saved(act, tmp_path_factory):
  """(transformers CLIPModel, its save_pretrained folder with tokenizer and preprocessor)."""
  if act not in _SAVED:
    ref = _reference(act)
    folder = str(tmp_path_factory.mktemp(f'clip_{act}'))
    ref.save_pretrained(folder)
    _as_old_transformers_wrote_it(os.path.join(folder, 'config.json'))
    tr.tiny_tokenizer().save_pretrained(folder)
    _processor().save_pretrained(folder)
    _SAVED[act] = ref, folder
  return _SAVED[act]


def _as_old_transformers_wrote_it(path):
  """The hub's CLIPModel configs (openai/clip-vit-large-patch14, LAION's): every generic
  PretrainedConfig key in the tower configs, and `*_config_dict` copies beside them."""
  with open(path) as f:
    raw = json.load(f)
  for tower in ('text_config', 'vision_config'):
    raw[tower] |= {'num_beams': 1, 'tie_word_embeddings': True, 'bad_words_ids': None,
                   'architectures': None, 'id2label': {'0': 'LABEL_0'}, '_name_or_path': ''}
    raw[tower + '_dict'] = {k: raw[tower][k] for k in ('hidden_act', 'hidden_size')}
  with open(path, 'w') as f:
    json.dump(raw, f)


@pytest.fixture(scope='module', params=['quick_gelu', 'gelu'])
def saved(request, tmp_path_factory):
  """Both activations: CLIP-L's quick_gelu, OpenCLIP's gelu."""
  return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def saved_gelu(tmp_path_factory):
  return _saved('gelu', tmp_path_factory)


def _processor():
  return transformers.CLIPImageProcessorPil(size={'shortest_edge': 32},
                                            crop_size={'height': 32, 'width': 32})


def _features(out):
  """get_*_features: a tensor in transformers 4, an output with the projection in 5."""
  return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


def _text_features(ref, prompts):
  """Text embeddings as torchmetrics makes them: padded to the longest, with the mask."""
  tok = tr.tiny_tokenizer()
  batch = tok(prompts, padding=True, return_tensors='pt')
  with torch.no_grad():
    return _features(ref.get_text_features(batch['input_ids'], batch['attention_mask']))


def test_transformers_clip_matches(saved):
  ref, folder = saved
  model = convert_clip.load_clip(folder)
  assert model.kind == 'transformers' and model.logit_scale == pytest.approx(ref.logit_scale.item())
  (vision, vision_params), (text, text_params) = model.vision, model.text
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  out = jax.jit(vision.apply)({'params': vision_params}, x)
  ids = np.random.default_rng(1).integers(0, 998, (2, 77))
  ids[0, 9:], ids[1, 40] = 999, 999  # EOS (then EOS padding in row 0)
  with torch.no_grad():
    expected = ref.vision_model(pixel_values=tr.nchw(x), output_hidden_states=True)
    image_embeds = ref.visual_projection(expected.pooler_output).numpy()
    text_embeds = _features(ref.get_text_features(torch.from_numpy(ids)))
  assert out.image_embeds.shape == (2, PROJECTION)
  assert tr.rel_err(out.image_embeds, image_embeds) <= RTOL
  assert tr.rel_err(out.pooler_output, expected.pooler_output.numpy()) <= RTOL
  assert tr.rel_err(out.last_hidden_state, expected.last_hidden_state.numpy()) <= RTOL
  assert len(out.hidden_states) == len(expected.hidden_states) == 3
  assert tr.rel_err(out.hidden_states[0], expected.hidden_states[0].numpy()) <= RTOL
  text_out = jax.jit(text.apply)({'params': text_params}, jnp.asarray(ids))
  assert tr.rel_err(text_out.text_embeds, text_embeds) <= RTOL


def test_clip_score_matches_the_torchmetrics_formula(saved_gelu):
  ref, folder = saved_gelu
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 53), (32, 32),
                                                                          (75, 36))]
  pixels = _processor()(images=images, return_tensors='np')['pixel_values']
  scorer = clip_score.CLIPScorer.from_path(folder, batch_size=8)
  np.testing.assert_allclose(clip_score.preprocess(images, scorer.settings),
                             pixels.transpose(0, 2, 3, 1), atol=1e-5)
  with torch.no_grad():
    image_features = _features(ref.get_image_features(torch.from_numpy(pixels)))
  text_features = _text_features(ref, PROMPTS)
  # torchmetrics' _clip_score_update, then its clip of the mean at 0.
  norm = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)
  scores = 100 * np.sum(norm(image_features) * norm(text_features[:3]), axis=-1)
  cosines = scorer.cosines(images, PROMPTS[:3])
  np.testing.assert_allclose(cosines, scores / 100, atol=1e-5)
  result = scorer.evaluate(images, PROMPTS[:3])
  assert result['clip_score'] == pytest.approx(max(scores.mean(), 0.0), abs=1e-3)
  assert result['clip_cosine'] == pytest.approx(scores.mean() / 100, abs=1e-5)
  assert result['n'] == 3
  ours = scorer.text_embeds(PROMPTS)  # two chunks of 8, the second padded
  assert ours.shape == (len(PROMPTS), PROJECTION)
  assert tr.rel_err(ours, text_features) <= RTOL
  assert tr.rel_err(scorer.image_embeds(images), image_features) <= RTOL


def test_score_scales():
  assert clip_score.clip_score([0.3, -0.1]) == pytest.approx(10.0)  # 100 x the mean
  assert clip_score.mean_cosine([0.3, -0.1]) == pytest.approx(0.1)  # MLPerf: the mean
  assert clip_score.clip_score([-0.2, 0.1]) == 0.0  # the mean is clipped, not each score
  assert clip_score.mean_cosine([-0.2, 0.1]) == pytest.approx(-0.05)


def _to_open_clip(state):
  """A transformers CLIPModel state dict renamed into open_clip's CLIP (written independently
  of convert.clip's table): fused in_proj, (width, dim) projections used as x @ P."""
  out = {'token_embedding.weight': state['text_model.embeddings.token_embedding.weight'],
         'positional_embedding': state['text_model.embeddings.position_embedding.weight'],
         'text_projection': state['text_projection.weight'].T.copy(),
         'logit_scale': state['logit_scale'],
         'attn_mask': np.triu(np.full((77, 77), -np.inf, np.float32), 1),  # a buffer: dropped
         'visual.class_embedding': state['vision_model.embeddings.class_embedding'],
         'visual.positional_embedding': state['vision_model.embeddings.position_embedding.weight'],
         'visual.conv1.weight': state['vision_model.embeddings.patch_embedding.weight'],
         'visual.proj': state['visual_projection.weight'].T.copy()}
  for ours, theirs in (('ln_final', 'text_model.final_layer_norm'),
                       ('visual.ln_pre', 'vision_model.pre_layrnorm'),
                       ('visual.ln_post', 'vision_model.post_layernorm')):
    for leaf in ('weight', 'bias'):
      out[f'{ours}.{leaf}'] = state[f'{theirs}.{leaf}']
  for ours, theirs in (('transformer', 'text_model'), ('visual.transformer', 'vision_model')):
    for i in range(2):
      a, b = f'{ours}.resblocks.{i}.', f'{theirs}.encoder.layers.{i}.'
      for leaf in ('weight', 'bias'):
        out[f'{a}attn.in_proj_{leaf}'] = np.concatenate(
            [state[f'{b}self_attn.{n}_proj.{leaf}'] for n in 'qkv'])
        for x, y in (('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2'), ('mlp.c_fc', 'mlp.fc1'),
                     ('mlp.c_proj', 'mlp.fc2'), ('attn.out_proj', 'self_attn.out_proj')):
          out[f'{a}{x}.{leaf}'] = state[f'{b}{y}.{leaf}']
  return out


MODEL_CFG = {'embed_dim': PROJECTION,
             'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 48, 'head_width': 12,
                            'mlp_ratio': 2.0, 'patch_size': 8},
             'text_cfg': {'context_length': 77, 'vocab_size': 1000, 'width': 32, 'heads': 4,
                          'layers': 2, 'mlp_ratio': 37 / 32}}


def _outputs(model, x, ids):
  (vision, vp), (text, tp) = model.vision, model.text
  return (jax.jit(vision.apply)({'params': vp}, x).image_embeds,
          jax.jit(text.apply)({'params': tp}, jnp.asarray(ids)).text_embeds)


def test_open_clip_checkpoints_load_to_the_same_outputs(tmp_path):
  ref = _reference('gelu')  # open_clip's LAION towers: exact GELU
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  open_clip = _to_open_clip(state)
  st_numpy.save_file(open_clip, str(tmp_path / 'open_clip_model.safetensors'))
  with open(tmp_path / 'open_clip_config.json', 'w') as f:
    json.dump({'model_cfg': MODEL_CFG, 'preprocess_cfg': {'mean': [0.5] * 3, 'std': [0.5] * 3}}, f)
  os.makedirs(tmp_path / 'bin')
  torch.save({k: torch.from_numpy(v) for k, v in open_clip.items()},
             tmp_path / 'bin' / 'open_clip_pytorch_model.bin')
  x = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = np.random.default_rng(4).integers(0, 998, (2, 77))
  ids[:, 20] = 999
  with torch.no_grad():
    expected = (_features(ref.get_image_features(tr.nchw(x))),
                _features(ref.get_text_features(torch.from_numpy(ids))))
  from_folder = convert_clip.load_clip(str(tmp_path))  # the config beside the weights
  from_bin = convert_clip.load_clip(str(tmp_path / 'bin' / 'open_clip_pytorch_model.bin'),
                                    model=MODEL_CFG)  # through the torch-free unpickler
  for model in (from_folder, from_bin):
    assert model.kind == 'open_clip'
    assert model.logit_scale == pytest.approx(ref.logit_scale.item())
    for ours, theirs in zip(_outputs(model, x, ids), expected):
      assert tr.rel_err(ours, theirs) <= RTOL
  settings = clip_score.Preprocess.for_model(from_folder)
  assert settings.image_mean == (0.5,) * 3 and settings.crop_size == (32, 32)
  assert settings.round_crop_offset  # torchvision's CenterCrop


def test_mismatched_open_clip_weights_list_every_key(tmp_path):
  state = _to_open_clip({k: v.numpy() for k, v in _reference('gelu').state_dict().items()})
  del state['visual.ln_post.bias']
  state['visual.extra_token'] = np.zeros(3, np.float32)
  state['visual.class_embedding'] = np.zeros(5, np.float32)
  st_numpy.save_file(state, str(tmp_path / 'open_clip_model.safetensors'))
  with pytest.raises(tables.WeightsMismatchError) as e:
    convert_clip.load_clip(str(tmp_path), model=MODEL_CFG)
  for key in ('vision_model.post_layernorm.bias', 'visual.extra_token',
              'vision_model.embeddings.class_embedding'):
    assert key in str(e.value)
  with pytest.raises(convert_clip.diffusers_lib.ConversionError, match='ViT-H-14'):
    convert_clip.load_clip(str(tmp_path))  # no open_clip_config.json and no model name
  with pytest.raises(convert_clip.diffusers_lib.ConversionError, match='attentional_pool'):
    convert_clip.open_clip_configs(MODEL_CFG | {'vision_cfg': dict(MODEL_CFG['vision_cfg'],
                                                                   attentional_pool=True)})


def test_vision_model_folder_loads(saved_gelu, tmp_path):
  """A CLIPVisionModelWithProjection folder (an unCLIP pipeline's image_encoder/)."""
  ref, folder = saved_gelu
  vision = transformers.CLIPVisionModelWithProjection(ref.config.vision_config)
  vision.config.projection_dim = PROJECTION
  vision = transformers.CLIPVisionModelWithProjection(vision.config)
  state = ref.state_dict()
  vision.load_state_dict({k: state[k] for k in vision.state_dict()})
  vision.save_pretrained(tmp_path)
  module, params = convert_clip.load_vision_model(str(tmp_path))
  clip_vision, clip_params = convert_clip.load_clip(folder).vision
  assert module.config == clip_vision.config  # the same tower: same outputs
  jax.tree.map(np.testing.assert_array_equal, params, clip_params)


def test_presets():
  # Published sizes with the projection: CLIP ViT-L/14 303.97M (transformers'
  # CLIPVisionModelWithProjection), OpenCLIP ViT-H/14 632.08M and bigG/14 1844.91M (open_clip's
  # image tower). Shapes only for the one MLPerf uses (tracing 32-48 layers is slow on CPU).
  abstract = convert_clip._abstract_vision(
      image_encoder.CLIPVisionModel(image_encoder.VisionConfig.openclip_h14()))
  assert round(sum(x.size for x in jax.tree.leaves(abstract)) / 1e6, 2) == 632.08
  assert abstract['embeddings']['position_embedding']['embedding'].shape == (257, 1280)
  for preset, millions in (('clip_l14', 303.97), ('openclip_h14', 632.08),
                           ('openclip_bigg14', 1844.91)):
    config = getattr(image_encoder.VisionConfig, preset)()
    assert round(_count(config) / 1e6, 2) == millions, preset
    assert image_encoder.VisionConfig.from_transformers(config.to_transformers()) == config
  for name, preset in (('ViT-H-14', 'openclip_h14'), ('ViT-bigG-14', 'openclip_bigg14')):
    vision = convert_clip.open_clip_configs(convert_clip.OPEN_CLIP_MODELS[name])[1]
    assert vision == getattr(image_encoder.VisionConfig, preset)(), name


def _count(c):
  """The tower's parameter count from its config (checked against the module above)."""
  d, n = c.hidden_size, c.num_patches + 1
  layer = 4 * (d * d + d) + 2 * d * c.intermediate_size + c.intermediate_size + d + 4 * d
  return (d + c.num_channels * c.patch_size ** 2 * d + n * d + 4 * d
          + c.num_hidden_layers * layer + d * c.projection_dim)


def test_clip_score_command_reads_a_samples_folder(saved_gelu, tmp_path, capsys):
  """`python -m ldm_jax.evaluation clip-score`: sample.py's folder layout, the library's score."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ldm_jax.evaluation import __main__ as command  # pylint: disable=g-import-not-at-top
  _, folder = saved_gelu
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
  with open(tmp_path / 'samples.jsonl', 'w') as f:
    for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
      Image.fromarray(image).save(tmp_path / f'{i:05d}.png')
      f.write(json.dumps({'file': f'{i:05d}.png', 'prompt': prompt}) + '\n')
  command.main(['clip-score', '--samples', str(tmp_path), '--clip', str(folder),
                '--batch_size', '8'])
  want = clip_score.CLIPScorer.from_path(folder, batch_size=8).evaluate(images, PROMPTS[:3])
  out = capsys.readouterr().out
  assert f'CLIP score {want["clip_score"]:.4f}' in out and f'{want["clip_cosine"]:.4f}' in out


def test_in_training_evaluation_logs_the_clip_score(saved_gelu, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  _, folder = saved_gelu
  images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

  class Stage:
    name, samples, frozen = 'fake', True, {}

    def sample(self, ema_params, frozen, prompts, mesh, settings):
      return images[:len(prompts)]

  (tmp_path / 'prompts.txt').write_text('\n'.join(PROMPTS[:2]) + '\n')
  config = ml_collections.ConfigDict({'data': {}, 'eval': dict(
      every=1, metrics='clip', prompts_file=str(tmp_path / 'prompts.txt'), num_images=4,
      batch_size=8, steps=1, sampler='ddim', guidance=1.0, seed=0, target='clip_cosine>=-1',
      fid_stats='', inception='', clip=str(folder))})
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  values, _ = evaluate.Evaluator(Stage(), config, str(tmp_path), mesh).evaluate({}, {}, 1)
  prompts = PROMPTS[:2] * 2  # the file's prompts, repeated to num_images
  want = clip_score.CLIPScorer.from_path(folder, batch_size=8).evaluate(images, prompts)
  assert values == {'eval/clip_score': pytest.approx(want['clip_score'], abs=1e-4),
                    'eval/clip_cosine': pytest.approx(want['clip_cosine'], abs=1e-6)}
