"""Training losses against hand-computed values; the ViT image tower and PatchGAN discriminator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import discriminator
from ldm_jax.models import image_encoder
from ldm_jax.train import losses


def _host_params(module, *inputs, seed=0):
  """`build.random_params`' host-side draw for modules build.py does not know (no init compile)."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.standard_normal(leaf.shape, dtype=np.float32)
    if path[-1].key == 'kernel':
      x /= np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      x *= 0.02
      if path[-1].key == 'scale':
        x += 1.0
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


# ----------------------------------------------------------------------------- CLIP contrastive


def test_clip_contrastive_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
  scale = math.log(1 / 0.07)
  loss, m = losses.clip_contrastive(jnp.asarray(img), jnp.asarray(txt), scale)

  i = img / np.linalg.norm(img, axis=1, keepdims=True)
  t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = np.exp(scale) * i @ t.T
  l_i2t = -np.mean(np.diag(_np_log_softmax(logits, 1)))
  l_t2i = -np.mean(np.diag(_np_log_softmax(logits, 0)))
  np.testing.assert_allclose(loss, (l_i2t + l_t2i) / 2, rtol=1e-5)
  np.testing.assert_allclose([m['loss_i2t'], m['loss_t2i']], [l_i2t, l_t2i], rtol=1e-5)
  labels = np.arange(6)
  np.testing.assert_allclose(m['accuracy_i2t'], np.mean(logits.argmax(1) == labels))
  np.testing.assert_allclose(m['accuracy_t2i'], np.mean(logits.argmax(0) == labels))
  np.testing.assert_allclose(m['temperature'], 0.07, rtol=1e-5)
  assert loss.dtype == jnp.float32


def test_clip_contrastive_is_symmetric_and_clips_the_scale():
  rng = np.random.default_rng(1)
  img = jnp.asarray(rng.standard_normal((5, 4)), jnp.bfloat16)
  txt = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
  a, ma = losses.clip_contrastive(img, txt, 2.0)
  b, mb = losses.clip_contrastive(txt, img, 2.0)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose([ma['loss_i2t'], ma['accuracy_i2t']],
                             [mb['loss_t2i'], mb['accuracy_t2i']], rtol=1e-6)
  # Above log(100) the scale is clipped: same loss, no gradient to the scale.
  high = losses.clip_contrastive(img, txt, 7.0)[0]
  np.testing.assert_allclose(high, losses.clip_contrastive(img, txt, math.log(100.0))[0], rtol=1e-6)
  assert jax.grad(lambda s: losses.clip_contrastive(img, txt, s)[0])(7.0) == 0.0
  with pytest.raises(ValueError, match='must both be'):
    losses.clip_contrastive(img, txt[:4], 2.0)


def test_perfect_alignment_gives_accuracy_one_and_the_closed_form_loss():
  b, s = 4, math.log(3.0)
  img = jnp.eye(b, 8) * 3.0  # orthonormal after normalisation; the text is the same direction
  loss, m = losses.clip_contrastive(img, 0.5 * img, s)
  assert m['accuracy'] == m['accuracy_i2t'] == m['accuracy_t2i'] == 1.0
  # Diagonal logits 3, off-diagonal 0: -log(e^3 / (e^3 + b - 1)).
  np.testing.assert_allclose(loss, -math.log(math.exp(3) / (math.exp(3) + b - 1)), rtol=1e-5)


# ----------------------------------------------------------------------------- autoencoder


def test_reconstruction_hand_values():
  x = jnp.array([[[1.0, -1.0]], [[0.0, 2.0]]])  # (2, 1, 2)
  y = jnp.array([[[0.0, 1.0]], [[0.5, 2.0]]])  # |d| = 1, 2, 0.5, 0
  np.testing.assert_allclose(losses.reconstruction(x, y), 3.5 / 4)
  np.testing.assert_allclose(losses.reconstruction(x, y, 'l2'), 5.25 / 4)
  np.testing.assert_allclose(losses.reconstruction(x, y, 'l1', reduction='sum'), 3.5 / 2)
  with pytest.raises(ValueError, match='kind'):
    losses.reconstruction(x, y, 'l3')


def test_kl_divergence_zero_and_closed_form():
  z = jnp.zeros((3, 2, 2, 4))
  assert losses.kl_divergence(z, z) == 0.0
  rng = np.random.default_rng(2)
  mean, logvar = rng.standard_normal((3, 2, 2, 4)), rng.standard_normal((3, 2, 2, 4))
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2 per dim; summed, batch-averaged.
  s = np.exp(0.5 * logvar)
  closed = (np.log(1 / s) + (s ** 2 + mean ** 2) / 2 - 0.5).sum(axis=(1, 2, 3)).mean()
  np.testing.assert_allclose(losses.kl_divergence(mean, logvar), closed, rtol=1e-5)
  # One latent dim with mean 1, var 1 contributes exactly 0.5 nats; the batch mean divides by B.
  np.testing.assert_allclose(losses.kl_divergence(z.at[0, 0, 0, 0].set(1.0), z), 0.5 / 3)


def test_hinge_and_generator_losses_hand_values():
  real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
  fake = jnp.array([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 1.0), rtol=1e-6)
  np.testing.assert_allclose(losses.generator_adv_loss(fake), 1 / 3, rtol=1e-6)
  assert losses.hinge_d_loss(jnp.full((2, 3, 3, 1), 1.0), jnp.full((2, 3, 3, 1), -1.0)) == 0.0
  np.testing.assert_allclose(losses.vanilla_d_loss(jnp.zeros(2), jnp.zeros(2)), math.log(2))
  assert losses.adopt_weight(1.0, 9, 10) == 0.0 and losses.adopt_weight(1.0, 10, 10) == 1.0


def _toy_autoencoder():
  """A one-layer "decoder" y = h @ kernel, with fixed features h and a linear "discriminator"."""
  rng = np.random.default_rng(3)
  h, x = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
  kernel, disc = rng.standard_normal((3, 2)), np.array([0.7, -1.3])
  params = {'decoder': {'conv_out': {'kernel': jnp.asarray(kernel, jnp.float32)}},
            'encoder': {'conv_in': {'kernel': jnp.ones(2)}}}

  def decode(p):
    return jnp.asarray(h, jnp.float32) @ p['decoder']['conv_out']['kernel']

  rec = lambda p: losses.reconstruction(x, decode(p), 'l2')
  gan = lambda p: losses.generator_adv_loss(decode(p) @ disc)
  return h, x, kernel, disc, params, rec, gan


def test_adaptive_gan_weight_hand_computed():
  h, x, kernel, disc, params, rec, gan = _toy_autoencoder()
  g_rec = 2.0 / x.size * h.T @ (h @ kernel - x)  # d mean((hK - x)^2) / dK
  g_gan = -np.outer(h.sum(0), disc) / h.shape[0]  # d -mean(hK w) / dK
  expected = np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4)

  of_kernel = lambda loss: lambda k: loss(losses.replace_leaf(params, losses.DECODER_LAST_LAYER, k))
  rn, gn = losses.last_layer_grad_norms((of_kernel(rec), of_kernel(gan)),
                                        params['decoder']['conv_out']['kernel'])
  np.testing.assert_allclose([rn, gn], [np.linalg.norm(g_rec), np.linalg.norm(g_gan)], rtol=1e-5)
  np.testing.assert_allclose(losses.adaptive_gan_weight(rn, gn), expected, rtol=1e-5)
  assert losses.adaptive_gan_weight(1.0, 0.0) == 1e4  # 1 / 1e-4, at the clip
  assert losses.adaptive_gan_weight(1.0, 0.0, max_weight=50.0) == 50.0

  # Inside an outer jax.grad the weight is a constant: grad = grad(rec) + w * grad(gan).
  def total(p):
    kern = p['decoder']['conv_out']['kernel']
    w = losses.adaptive_gan_weight(*losses.last_layer_grad_norms(
        (of_kernel(rec), of_kernel(gan)), kern))
    return rec(p) + w * gan(p)

  grads = jax.jit(jax.grad(total))(params)
  np.testing.assert_allclose(grads['decoder']['conv_out']['kernel'], g_rec + expected * g_gan,
                             rtol=1e-4, atol=1e-6)
  with pytest.raises(KeyError, match='conv_outt'):
    losses.replace_leaf(params, 'decoder/conv_outt/kernel', 0)


# ----------------------------------------------------------------------------- diffusion


def test_min_snr_weights_hand_values():
  snr = jnp.array([0.0, 0.5, 5.0, 20.0])
  np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, 'epsilon'), [1, 1, 1, 0.25])
  np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, 'v_prediction'),
                             [0, 0.5 / 1.5, 5 / 6, 5 / 21], rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, 'sample'), [0, 0.5, 5, 5])
  with pytest.raises(ValueError, match='prediction_type'):
    losses.min_snr_weights(snr, 5.0, 'flow')


def test_diffusion_mse_per_example_then_weighted_mean():
  pred = jnp.zeros((2, 2, 1, 1))
  target = jnp.array([1.0, 3.0, 2.0, 2.0]).reshape(2, 2, 1, 1)  # per-example MSE 5 and 4
  np.testing.assert_allclose(losses.diffusion_mse(pred, target), 4.5)
  np.testing.assert_allclose(losses.diffusion_mse(pred, target, jnp.array([0.5, 2.0])),
                             (2.5 + 8.0) / 2)


# ----------------------------------------------------------------------------- networks


def test_vit_image_encoder_shapes_and_sensitivity():
  # The clip stage's tower: CLIP's vision model (transformers' layout), mean-pooled.
  config = image_encoder.VisionConfig.tiny(pooling='mean')
  model = image_encoder.CLIPVisionModel(config)
  images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  params = _host_params(model, images)
  assert params['embeddings']['position_embedding']['embedding'].shape == (65, 64)
  assert params['embeddings']['patch_embedding']['kernel'].shape == (4, 4, 3, 64)
  assert 'bias' not in params['embeddings']['patch_embedding']  # as in CLIP
  assert params['embeddings']['class_embedding'].shape == (64,)
  assert set(params['encoder']) == {'layers_0', 'layers_1'}
  assert 'bias' not in params['visual_projection']
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x).image_embeds)
  out = apply(params, images)
  assert out.shape == (2, 64) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  changed = apply(params, images.at[0, :8, :8].set(1.0))
  assert not np.allclose(changed[0], out[0], atol=1e-4)  # the changed image moves its embedding
  np.testing.assert_allclose(changed[1], out[1], atol=1e-6)  # and no other example's
  with pytest.raises(ValueError, match='takes 32x32'):
    model.apply({'params': params}, images[:, :16, :16])


def test_patchgan_discriminator_shapes_and_taming_layout():
  images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  tiny = discriminator.NLayerDiscriminator(discriminator.DiscriminatorConfig.tiny())
  params = _host_params(tiny, images)
  logits = jax.jit(tiny.apply)({'params': params}, images)
  assert logits.shape == (2, 6, 6, 1) and logits.dtype == jnp.float32  # 32 / 2**2 - 2
  assert np.isfinite(np.asarray(logits)).all()

  ldm = discriminator.NLayerDiscriminator(discriminator.DiscriminatorConfig.ldm())
  abstract = jax.eval_shape(lambda: ldm.init(jax.random.key(0), images))['params']
  assert sorted(abstract, key=lambda k: int(k[5:])) == [
      'main_0', 'main_2', 'main_3', 'main_5', 'main_6', 'main_8', 'main_9', 'main_11']
  assert abstract['main_8']['kernel'].shape == (4, 4, 256, 512) and 'bias' not in abstract['main_8']
  # taming's NLayerDiscriminator(3, 64, 3) parameter count, its BatchNorm affine included.
  assert sum(x.size for x in jax.tree.leaves(abstract)) == 2_765_633
  assert jax.eval_shape(ldm.apply, {'params': abstract}, images).shape == (2, 2, 2, 1)

  plain = discriminator.NLayerDiscriminator(discriminator.DiscriminatorConfig.tiny(norm='none'))
  plain_params = jax.eval_shape(lambda: plain.init(jax.random.key(0), images))['params']
  assert set(plain_params) == {'main_0', 'main_2', 'main_5', 'main_8'}
  assert 'bias' in plain_params['main_2']
  with pytest.raises(ValueError, match='batch'):
    discriminator.DiscriminatorConfig(norm='batch')
