"""LoRA and textual inversion against diffusers/PEFT: both directions, both file layouts.

Tiny random float32 models from torch_reference; U-Net and text-encoder outputs agree to
max |ours - ref| <= 1e-4 * max |ref|. Compiles are few: one jitted forward per network, reused
for every parameter tree (adapted trees keep the base tree's structure and dtypes), and one
jitted `lora.apply` per adapter layout (scales and alphas are traced, not baked in).
"""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import torch_reference as tr
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.convert import diffusers as convert_diffusers
from ldm_jax.convert import lora as convert_lora
from ldm_jax.convert import textual_inversion
from ldm_jax.models import lora

torch = tr.torch
peft = pytest.importorskip('peft')
from peft import utils as peft_utils  # pylint: disable=g-import-not-at-top

RTOL = 1e-4
UNET_TARGETS = ('attention', 'feed_forward', 'projections', 'conv')
TEXT_TARGETS = ('text_attention', 'text_mlp')


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """A tiny diffusers folder, our networks loaded from it, inputs and the jitted forwards."""
  folder = str(tmp_path_factory.mktemp('pipe'))
  tr.save_pipeline(folder)
  unet, unet_params = convert_diffusers.load_unet(os.path.join(folder, 'unet'))
  te, te_params = convert_diffusers.load_text_encoder(os.path.join(folder, 'text_encoder'))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 998, (2, 77))
  ids[:, 0], ids[0, 9:], ids[1, 30] = 998, 999, 999  # BOS, EOS (+ EOS padding)
  return types.SimpleNamespace(
      folder=folder, unet=unet, unet_params=unet_params, te=te, te_params=te_params,
      x=rng.standard_normal((2, 8, 8, 4)).astype(np.float32), t=np.array([3, 801]),
      context=rng.standard_normal((2, 7, 32)).astype(np.float32), ids=ids,
      unet_fn=jax.jit(lambda p, x, t, c: unet.apply({'params': p}, x, t, c)),
      te_fn=jax.jit(lambda p, ids: te.apply({'params': p}, ids).last_hidden_state),
      apply_fn=jax.jit(lora.apply))


def ours_unet(env, params):
  return np.asarray(env.unet_fn(params, env.x, env.t, env.context))


def ours_text(env, params):
  return np.asarray(env.te_fn(params, env.ids))


def torch_unet(env, unet):
  with torch.no_grad():
    out = unet(tr.nchw(env.x), torch.from_numpy(env.t), torch.from_numpy(env.context)).sample
  return tr.nhwc(out)


def torch_text(env, text_encoder):
  with torch.no_grad():
    return text_encoder(torch.from_numpy(env.ids)).last_hidden_state.numpy()


def random_adapters(params, targets, rank, seed):
  """lora.init's adapters with a random nonzero B, so that the LoRA changes the outputs."""
  adapters = lora.init(params, lora.LoraConfig(rank=rank, targets=targets), jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, v: rng.normal(0, 0.3, v.shape).astype(np.float32) if p[-1].key == 'up' else v,
      adapters)


def pipeline(env):
  return tr.diffusers.StableDiffusionPipeline.from_pretrained(env.folder, safety_checker=None)


def test_our_loras_load_in_diffusers(env, tmp_path):
  """PEFT and kohya files we write give diffusers our outputs, alone and mixed with scales."""
  ua, ta = (random_adapters(env.unet_params, UNET_TARGETS, 4, 1),
            random_adapters(env.te_params, TEXT_TARGETS, 2, 2))
  ub, tb = (random_adapters(env.unet_params, UNET_TARGETS, 2, 3),
            random_adapters(env.te_params, TEXT_TARGETS, 3, 4))
  alpha_a, alpha_b = {'unet': 8.0, 'text_encoder': 1.0}, {'unet': 1.0, 'text_encoder': 6.0}
  convert_lora.save_lora({'unet': ua, 'text_encoder': ta}, str(tmp_path / 'a'), alpha_a)
  convert_lora.save_lora({'unet': ub, 'text_encoder': tb}, str(tmp_path / 'b.safetensors'),
                         alpha_b, layout='kohya')
  pipe = pipeline(env)
  pipe.load_lora_weights(str(tmp_path / 'a'), adapter_name='a')
  pipe.load_lora_weights(str(tmp_path / 'b.safetensors'), adapter_name='b')
  a = lambda net, s: ({'unet': ua, 'text_encoder': ta}[net], s, alpha_a[net])
  b = lambda net, s: ({'unet': ub, 'text_encoder': tb}[net], s, alpha_b[net])
  base_unet = ours_unet(env, env.unet_params)
  # Ours always applies both LoRAs (scale 0 for an inactive one): one compile per network.
  for names, (wa, wb) in ((['a'], (1.0, 0.0)), (['b'], (0.0, 1.0)), (['a', 'b'], (0.7, 0.4))):
    pipe.set_adapters(names, adapter_weights=[w for w in (wa, wb) if w])
    ours = ours_unet(env, env.apply_fn(env.unet_params, [a('unet', wa), b('unet', wb)]))
    assert tr.rel_err(ours, base_unet) > 1e-2  # the LoRA matters
    assert tr.rel_err(ours, torch_unet(env, pipe.unet)) <= RTOL, names
    te_params = env.apply_fn(env.te_params, [a('text_encoder', wa), b('text_encoder', wb)])
    assert tr.rel_err(ours_text(env, te_params), torch_text(env, pipe.text_encoder)) <= RTOL


def _peft_models(env):
  """diffusers/transformers networks with PEFT adapters: random A and B, rank/alpha patterns."""
  unet = tr.diffusers.UNet2DConditionModel.from_pretrained(os.path.join(env.folder, 'unet'))
  te = tr.transformers.CLIPTextModel.from_pretrained(os.path.join(env.folder, 'text_encoder'))
  torch.manual_seed(0)
  unet.add_adapter(peft.LoraConfig(
      r=4, lora_alpha=2, init_lora_weights=False, rank_pattern={'conv2': 2},
      alpha_pattern={'attn2.to_k': 8}, target_modules=[
          'to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'proj_out', 'ff.net.0.proj',
          'ff.net.2', 'conv1', 'conv2', 'conv', 'conv_shortcut', 'time_emb_proj']))
  # PEFT itself (transformers' `add_adapter` wants a newer PEFT than this suite pins).
  te_config = peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=[
      'q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'])
  te = peft.inject_adapter_in_model(te_config, te)
  return unet.eval(), te.eval(), te_config


def _old_layout(state):
  """diffusers' attention-processor era names of a PEFT-layout state dict (for reading)."""
  out = {}
  for key, value in state.items():
    key = key.replace('.lora_A.weight', '.lora.down.weight').replace(
        '.lora_B.weight', '.lora.up.weight')
    for c in ('q', 'k', 'v'):
      key = key.replace(f'.attn1.to_{c}.lora.', f'.attn1.processor.to_{c}_lora.')
      key = key.replace(f'.self_attn.{c}_proj.lora.', f'.self_attn.to_{c}_lora.')
    key = key.replace('.attn2.to_out.0.lora.', '.attn2.processor.to_out_lora.')
    key = key.replace('.mlp.fc1.lora.', '.mlp.fc1.lora_linear_layer.')
    out[key] = value
  return out


def test_diffusers_lora_loads_in_ours(env, tmp_path):
  """A LoRA made with PEFT and saved by `save_lora_weights` gives ours diffusers' outputs; the
  older diffusers names and kohya's sgm names read the same."""
  unet, te, te_config = _peft_models(env)
  tr.diffusers.StableDiffusionPipeline.save_lora_weights(
      str(tmp_path / 'peft'), unet_lora_layers=peft_utils.get_peft_model_state_dict(unet),
      text_encoder_lora_layers=peft_utils.get_peft_model_state_dict(te, adapter_name='default'),
      unet_lora_adapter_metadata=unet.peft_config['default'].to_dict(),
      text_encoder_lora_adapter_metadata=te_config.to_dict())
  base = {'unet': env.unet_params, 'text_encoder': env.te_params}
  loaded = convert_lora.load_lora(str(tmp_path / 'peft'), base)
  assert loaded.layout == 'peft'
  alphas = loaded.alpha['unet']
  assert alphas['down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k'] == 8
  assert alphas['down_blocks_0/resnets_0/conv2'] == 2
  ours = ours_unet(env, env.apply_fn(env.unet_params, *loaded.entry('unet')))
  assert tr.rel_err(ours, torch_unet(env, unet)) <= RTOL
  ours = ours_text(env, env.apply_fn(env.te_params, *loaded.entry('text_encoder')))
  assert tr.rel_err(ours, torch_text(env, te)) <= RTOL

  # The same adapters under other names: diffusers' old layout, kohya's sgm U-Net names.
  state, _ = convert_lora.read_file(str(tmp_path / 'peft'))
  convert_diffusers.save_safetensors(_old_layout(state), str(tmp_path / 'old.safetensors'),
                                     {'format': 'pt'})
  old = convert_lora.load_lora(str(tmp_path / 'old.safetensors'), base)
  assert old.layout == 'diffusers_old'
  _assert_same_adapters(old.adapters, loaded.adapters)

  kohya = str(tmp_path / 'kohya.safetensors')
  convert_lora.save_lora(loaded.adapters, kohya, loaded.alpha, layout='kohya')
  sgm = convert_lora._sgm_prefixes(env.unet_params)  # pylint: disable=protected-access
  state, _ = convert_lora.read_file(kohya)
  to_sgm = {'lora_unet_' + n[0].replace('.', '_'):
            'lora_unet_' + convert_lora.sgm_names(n[0], sgm)[0].replace('.', '_')
            for n in convert_lora.module_names('unet', env.unet_params).values()}
  renamed = {}
  for key, value in state.items():
    lora_name, _, rest = key.partition('.')
    renamed[f'{to_sgm.get(lora_name, lora_name)}.{rest}'] = value
  assert any('input_blocks_1_1_transformer_blocks' in k for k in renamed)
  convert_diffusers.save_safetensors(renamed, kohya, {'format': 'pt'})
  again = convert_lora.load_lora(kohya, base)
  assert again.layout == 'kohya' and again.alpha == loaded.alpha
  _assert_same_adapters(again.adapters, loaded.adapters)


def _assert_same_adapters(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(g, e)


def test_merge_unmerge_and_the_unmerged_forward(env):
  """merge then unmerge gives the base back; merged, applied and intercepted forwards agree."""
  adapters = random_adapters(env.unet_params, UNET_TARGETS, 4, 5)
  scale, alpha = 0.5, 3.0

  @jax.jit
  def trees(base, adapters):
    merged = lora.merge(base, adapters, scale, alpha)
    return merged, lora.unmerge(merged, adapters, scale, alpha), lora.apply(
        base, adapters, scale, alpha)

  merged, restored, applied = trees(env.unet_params, adapters)
  for got, base in zip(jax.tree.leaves(restored), jax.tree.leaves(env.unet_params)):
    np.testing.assert_allclose(got, base, rtol=0, atol=1e-6)
  applied = ours_unet(env, applied)
  np.testing.assert_allclose(ours_unet(env, merged), applied, rtol=0, atol=1e-6)

  @jax.jit
  def intercepted(params, adapters):  # PEFT's order: base(x) + s * alpha/r * up(down(x))
    with lora.intercept(adapters, scale, alpha):
      return env.unet.apply({'params': params}, env.x, env.t, env.context)

  assert tr.rel_err(intercepted(env.unet_params, adapters), applied) <= RTOL

  # A bf16 base: the adapted kernels come back in float32, the rest stays bf16.
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), env.te_params)
  te_adapters = random_adapters(env.te_params, TEXT_TARGETS, 2, 6)
  q = jax.eval_shape(lora.apply, bf16, te_adapters)['encoder']['layers_0']['self_attn']['q_proj']
  assert q['kernel'].dtype == jnp.float32 and q['bias'].dtype == jnp.bfloat16
  merged = jax.eval_shape(lora.merge, bf16, te_adapters)
  assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}


def test_training_changes_only_the_adapters(env):
  """jax.grad through the adapters (with dropout, via intercept): the base stays bit for bit,
  the optimizer state is adapter-sized."""
  config = lora.LoraConfig(rank=2, alpha=4.0, dropout=0.1, targets=TEXT_TARGETS)
  adapters = lora.init(env.te_params, config, jax.random.key(0))
  n = lora.count_params(adapters)
  assert n == 3 * 2 * (4 * (32 + 32) + (32 + 37) + (37 + 32))  # layers x rank x (in + out)
  base = env.te_params
  before = jax.tree.map(np.array, base)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(adapters)
  target = np.ones((2, 77, 32), np.float32)

  @jax.jit
  def step(adapters, opt_state, base, key):
    def loss_fn(adapters):
      params, ctx = lora.prepare(base, adapters, 1.0, config.alpha, config.dropout, key)
      with ctx:
        hidden = env.te.apply({'params': params}, env.ids).last_hidden_state
      return jnp.mean(jnp.square(hidden - target))
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  losses = []
  for i in range(3):
    adapters, opt_state, loss = step(adapters, opt_state, base, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert all(np.abs(np.asarray(a['up'])).max() > 0 for a in lora.modules(adapters).values())
  for got, was in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(got), was)
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * n + 1  # mu, nu, count


def test_textual_inversion_loads_in_diffusers(env, tmp_path):
  """An embedding we write loads with load_textual_inversion and gives our text states."""
  rows = np.random.default_rng(7).normal(0, 0.5, (2, 32)).astype(np.float32)
  textual_inversion.save_textual_inversion(str(tmp_path), '<star>', rows)
  pipe = pipeline(env)
  pipe.load_textual_inversion(str(tmp_path), token='<star>')
  prompt = pipe.maybe_convert_prompt('a <star> on b', pipe.tokenizer)
  ref_ids = pipe.tokenizer(prompt, padding='max_length', max_length=77,
                           return_tensors='pt').input_ids
  with torch.no_grad():
    expected = pipe.text_encoder(ref_ids).last_hidden_state.numpy()

  token, loaded = textual_inversion.load_textual_inversion(str(tmp_path))
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(env.folder, 'tokenizer'))
  (te, params), added = textual_inversion.add_tokens(
      tokenizer, (env.te, env.te_params), token, loaded)
  assert added.ids == (1000, 1001)
  ids, _ = tokenizer_lib.tokenize(
      tokenizer, textual_inversion.expand_prompt('a <star> on b', token, len(loaded)))
  np.testing.assert_array_equal(ids, ref_ids.numpy())
  ours = jax.jit(lambda p, ids: te.apply({'params': p}, ids).last_hidden_state)(params, ids)
  assert tr.rel_err(ours, expected) <= RTOL


def test_load_lora_lists_every_problem(env, tmp_path):
  """Unknown modules, DoRA keys, half adapters and wrong shapes are all named in one error."""
  good = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
  half = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k'
  wrong = 'text_encoder.text_model.encoder.layers.0.mlp.fc1'
  state = {f'{good}.lora_A.weight': np.ones((2, 32)), f'{good}.lora_B.weight': np.ones((32, 2)),
           f'{half}.lora_A.weight': np.ones((2, 32)),
           f'{wrong}.lora_A.weight': np.ones((2, 32)), f'{wrong}.lora_B.weight': np.ones((40, 2)),
           'unet.no_such_block.to_q.lora_A.weight': np.ones((2, 32)),
           f'{good}.lora_magnitude_vector': np.ones((32,))}
  path = str(tmp_path / 'bad.safetensors')
  convert_diffusers.save_safetensors({k: v.astype(np.float32) for k, v in state.items()}, path,
                                     {'format': 'pt'})
  with pytest.raises(convert_lora.LoraFormatError) as e:
    convert_lora.load_lora(path, {'unet': env.unet_params, 'text_encoder': env.te_params})
  message = str(e.value)
  for needle in ('unet.no_such_block.to_q.lora_A.weight', 'DoRA', f'{half}: has [\'A\']',
                 'text_encoder.text_model.encoder.layers.0.mlp.fc1: A (2, 32), B (40, 2)'):
    assert needle in message, needle
  with pytest.raises(ValueError, match='match no Dense or Conv kernel'):
    lora.init(env.te_params, lora.LoraConfig(targets=('attention',)), jax.random.key(0))


def test_kohya_sdxl_names_are_the_ones_diffusers_maps(tmp_path):
  """kohya SDXL files name the U-Net by its sgm modules (input_blocks_4_1_...): diffusers' own
  SDXL conversion maps the ones we write back onto exactly our modules (shapes only, no compile)."""
  from ldm_jax.models import build  # pylint: disable=g-import-not-at-top
  ref = tr.tiny_sdxl_unet()
  ref.save_pretrained(tmp_path / 'unet')
  module, _ = convert_diffusers.load_unet(str(tmp_path / 'unet'))
  base = {'unet': build.abstract_params(module)}
  adapters = jax.tree.map(np.asarray, lora.init(
      base['unet'], lora.LoraConfig(rank=2, targets=('attention', 'conv', 'projections')),
      jax.random.key(0)))
  path = convert_lora.save_lora({'unet': adapters}, str(tmp_path / 'k.safetensors'), 2.0,
                                layout='kohya', base=base)
  state, _ = convert_lora.read_file(path)
  assert 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha' in state
  converted, alphas = tr.diffusers.StableDiffusionXLPipeline.lora_state_dict(
      path, unet_config=ref.config)
  converted = tr.diffusers.utils.state_dict_utils.convert_unet_state_dict_to_peft(
      {k.removeprefix('unet.'): v for k, v in converted.items()})
  theirs = {k.rsplit('.lora_', 1)[0] for k in converted}  # diffusers' module names
  ours = {convert_lora.names_of('unet', m)[0] for m in lora.modules(adapters)}
  assert theirs == ours and set(alphas.values()) == {2.0}
  loaded = convert_lora.load_lora(path, base)
  _assert_same_adapters(loaded.adapters['unet'], adapters)
