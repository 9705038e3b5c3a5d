"""Attention kernels: the Pallas TPU kernel (interpret mode) and the chunked path against XLA,
what 'auto' picks per backend, and the per-shard partitioning of a kernel."""

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import attention

P = jax.sharding.PartitionSpec


def _qkv(seed, lq, lk, heads, dim, batch=1, dtype=np.float32):
  rng = np.random.default_rng(seed)
  shapes = [(batch, lq, heads, dim)] + [(batch, lk, heads, dim)] * 2
  return [jnp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _value_and_vjp(fn, *args):
  """fn's outputs and their VJP for fixed random cotangents, jitted; and the compiled HLO."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return out, vjp(tree.unflatten(
        [jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, leaves)]))
  compiled = jax.jit(run).lower(*args).compile()
  return compiled(*args), compiled.as_text()


def _attend_both(impl, *qkvs):
  """One jitted call attending two (q, k, v) cases with `impl` (one compilation for both)."""
  attend = lambda q, k, v: attention.dot_product_attention(q, k, v, impl=impl)
  return _value_and_vjp(lambda *x: (attend(*x[:3]), attend(*x[3:])), *qkvs)[0]


def test_pallas_flash_attention_matches_xla_in_interpret_mode():
  # (64 queries, 77 keys, 2 heads of 64): cross-attention to the 77-token text context, keys
  # padded to the kernel's 128 and masked; (200, 300, 1 head of 40): SD 1.x's head dim,
  # zero-padded to 128 lanes, and several key blocks (the kernel's online softmax).
  qkvs = _qkv(0, 64, 77, 2, 64) + _qkv(1, 200, 300, 1, 40)
  xla = _attend_both('xla', *qkvs)
  with pltpu.force_tpu_interpret_mode():  # the TPU kernel, simulated on the CPU
    pallas = _attend_both('pallas', *qkvs)
  names = ['out[0]', 'out[1]'] + [f'{n}[{i}]' for i in (0, 1) for n in ('dq', 'dk', 'dv')]
  for name, a, b in zip(names, jax.tree.leaves(pallas), jax.tree.leaves(xla)):
    error = float(jnp.max(jnp.abs(a - b)))
    relative = error / float(jnp.max(jnp.abs(b)))
    print(f'{name}: max abs error {error:.2e}, relative to max |xla| {relative:.2e}')
    assert error <= 1e-5 and relative <= 1e-5, name


def test_auto_picks_the_backend_kernel_or_falls_back(monkeypatch):
  bf16 = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.bfloat16)  # SD 1.5's first attention
  f32 = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.float32)
  vae_head = jax.ShapeDtypeStruct((1, 4096, 1, 512), jnp.bfloat16)
  wide = jax.ShapeDtypeStruct((1, 256, 4, 192), jnp.bfloat16)
  causal = jnp.tril(jnp.ones((77, 77), bool))[None, None]
  resolve = attention.resolve_impl
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(attention, '_cuda_capability', lambda: (9, 0))  # Hopper
  assert resolve('auto', bf16, bf16) == 'cudnn'
  assert resolve('auto', wide, wide) == 'cudnn'
  assert [resolve('auto', f32, f32), resolve('auto', vae_head, vae_head)] == ['xla', 'xla']
  assert resolve('auto', bf16, bf16, causal) == 'xla'
  assert resolve('cudnn', bf16, bf16, causal) == 'xla'  # a mask never goes to a flash kernel
  monkeypatch.setattr(attention, '_cuda_capability', lambda: (8, 0))  # Ampere: head dim <= 128
  assert [resolve('auto', bf16, bf16), resolve('auto', wide, wide)] == ['cudnn', 'xla']
  monkeypatch.setattr(attention, '_cuda_capability', lambda: (0, 0))  # ROCm
  assert resolve('auto', bf16, bf16) == 'xla'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert [resolve('auto', x, x) for x in (bf16, f32, vae_head)] == ['pallas'] * 3
  assert resolve('auto', bf16, bf16, causal) == resolve('pallas', bf16, bf16, causal) == 'xla'
  assert resolve('xla', bf16, bf16) == 'xla'
  with pytest.raises(ValueError, match="'flash' is not one of"):
    resolve('flash', bf16, bf16)


_XLA_KERNEL = functools.partial(attention.dot_product_attention, impl='xla')


def test_per_shard_kernel_runs_on_batch_and_head_shards():
  # The TPU kernel's partitioning, checked with the XLA path as the kernel (interpret mode's
  # callbacks cannot be partitioned): batch over 'data', heads over 'model', no gathers.
  q, k, v = _qkv(3, 32, 20, 4, 8, batch=4)
  sharding = jax.sharding.NamedSharding(jax.make_mesh((4, 2), ('data', 'model')),
                                        P('data', None, 'model'))
  # pylint: disable-next=protected-access
  per_shard = functools.partial(attention._per_shard, _XLA_KERNEL)
  whole, _ = _value_and_vjp(_XLA_KERNEL, q, k, v)
  sharded, hlo = _value_and_vjp(per_shard, *jax.device_put((q, k, v), sharding))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), whole, sharded)
  assert all(x.sharding.is_equivalent_to(sharding, 4) for x in jax.tree.leaves(sharded))
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo


def test_query_chunked_attention_matches_one_einsum_and_is_auto_on_cpu(monkeypatch):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, n, 2, 8), np.float32)) for n in (60, 64, 64))
  loss = lambda q, k, v, impl: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, impl=impl)))
  # A new function per jit: jit reuses the traces of a function it has seen.
  grad = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  whole = grad()(q, k, v, 'xla')
  monkeypatch.setattr(attention, 'CPU_QUERY_CHUNK_LOGITS', 16 * 64)  # 16 rows of 64 keys per chunk
  assert attention._query_chunk(60, 64) == 15  # pylint: disable=protected-access
  chunked_grad = grad()
  chunked = chunked_grad(q, k, v, 'xla')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, chunked)
  assert jax.default_backend() == 'cpu' and attention.resolve_impl('auto', q, k) == 'xla'
  jax.tree.map(np.testing.assert_array_equal, chunked_grad(q, k, v, 'auto'), chunked)
