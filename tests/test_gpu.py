"""The GPU correctness harness (experiments/gpu_check.py) at its tiny shapes, one run per
mode, on a GPU: the Pallas kernels compiled for the device against the float32 reference.
The full runs (`python -m experiments.gpu_check --matrix`, ...) are the README's; on a
CPU the harness's own smoke tests are in tests/test_experiments_smoke.py."""
import functools
import json
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU (the kernels run compiled, not interpreted)")


@pytest.mark.parametrize("mode", ["", "--matrix", "--packed", "--offsets"])
def test_gpu_check_small(tmp_path, mode):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.gpu_check", "--small", *mode.split(),
       "--out", str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  [path] = tmp_path.glob("gpu_*.json")
  summary = json.loads(path.read_text())["summary"]
  assert summary["pass"] > 0 and summary["fail"] == summary["error"] == summary["skipped"] == 0, (
      summary)


def test_selected_block_major_passes_match_one_pass():
  """Compiled block-major kernels in passes of (batch row, KV head) units
  (Tiles.block_pass_bytes) give the output and gradients of one pass (bf16: dK and dV
  are summed by atomics in any order)."""
  import jax.numpy as jnp
  import numpy as np

  from pallas_kernels.selected_attention import selected_attention
  from pallas_kernels.selected_attention.tiles import Tiles

  B, T, HKV, G, D, n, block = 2, 4096, 4, 4, 128, 16, 64
  kq, kk, kv, kb, kc = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(kq, (B, T, HKV * G, D), jnp.bfloat16)
  k = jax.random.normal(kk, (B, T, HKV, D), jnp.bfloat16)
  v = jax.random.normal(kv, (B, T, HKV, D), jnp.bfloat16)
  ct = jax.random.normal(kc, q.shape, jnp.bfloat16)
  idx = jnp.argsort(jax.random.uniform(kb, (B, T, HKV, T // block)), axis=-1)[..., :n]
  idx = idx.astype(jnp.int32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(cap, q, k, v, ct):
    fn = lambda q, k, v: selected_attention(q, k, v, idx, block=block, scale=D ** -0.5,
                                            interpret=False,
                                            tiles=Tiles(block_major=True, block_pass_bytes=cap))
    o, vjp = jax.vjp(fn, q, k, v)
    return (o, *vjp(ct))

  one, passes = run(1 << 34, q, k, v, ct), run(1 << 28, q, k, v, ct)   # 1; 3 of 3 units
  for name, a, b in zip(("o", "dq", "dk", "dv"), one, passes):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2 * np.abs(a).max(), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("G", [4, 16])
def test_selected_block_bias_matches_the_reference(dtype, G):
  """The straight-through gate's score bias on the compiled kernels (block-major at any G):
  output and the gradients of q, k, v and the bias against the float32 reference, by the
  harness's measure and tolerance (`gpu_check_units.compare`: relative error norm; a bias
  gradient that is 0 by cancellation, as for a token that sees one block, is matched to
  TF32's absolute error, not to 0)."""
  import jax.numpy as jnp

  from experiments.gpu_check_units import compare, reference_precision, tolerance
  from nsa_jax import NSAConfig
  from nsa_jax.ops.selected import selected_attention_xla
  from pallas_kernels.selected_attention import selected_attention

  B, T, HKV, D, n, block = 1, 1000, 2, 128, 16, 64
  config = NSAConfig(select_block=block, num_selected=n)
  dt = jnp.dtype(dtype)
  kq, kk, kv, kb, kc, ks = jax.random.split(jax.random.key(1), 6)
  x = lambda key, *shape: jax.random.normal(key, shape, jnp.float32)
  q, k, v, ct = x(kq, B, T, HKV * G, D), x(kk, B, T, HKV, D), x(kv, B, T, HKV, D), x(
      kc, B, T, HKV * G, D)
  nb = -(-T // block)
  idx = jnp.argsort(jax.random.uniform(kb, (B, T, HKV, nb)), axis=-1)[..., :n].astype(jnp.int32)
  bias = 2.0 * x(ks, B, T, HKV, n)
  kernel = lambda q, k, v, b: selected_attention(q, k, v, idx, block=block, scale=D ** -0.5,
                                                 interpret=False, block_bias=b)
  reference = lambda q, k, v, b: selected_attention_xla(q, k, v, idx, config=config,
                                                        scale=D ** -0.5, block_bias=b)

  @functools.partial(jax.jit, static_argnums=0)
  def run(f, *args):
    o, vjp = jax.vjp(f, *args)
    return (o, *vjp(ct.astype(args[0].dtype)))

  got = run(kernel, *(a.astype(dt) for a in (q, k, v)), bias)
  with reference_precision("float32"):
    want = run(reference, q, k, v, bias)
  for name, a, b in zip(("o", "dq", "dk", "dv", "dbias"), got, want):
    err, max_rel, clean = compare(a, b)
    assert bool(clean) and float(err) <= tolerance("selected_attention", dtype), (
        name, float(err), float(max_rel))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_block_lse_kernel_matches_the_reference(dtype):
  """The distillation teacher's kernel (pallas_kernels/block_lse.py) compiled for the
  device, at the research preset's head shape, against `block_lse_xla` at float32 precision:
  -inf in the same places, values within 1e-4 (bf16 products are exact in float32, float32
  ones 3-pass TF32; both sum 128-term dots and 64-key blocks in different orders)."""
  import jax.numpy as jnp
  import numpy as np

  from nsa_jax.ops.distill import block_lse_xla
  from pallas_kernels.block_lse import block_lse

  B, T, HQ, HKV, D, block = 2, 4096, 16, 4, 128, 64
  kq, kk, kp, kd = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (B, 512, HQ, D), dtype)
  k = jax.random.normal(kk, (B, T, HKV, D), dtype)
  positions = jax.random.randint(kp, (512,), 0, T)
  doc_start = jax.random.randint(kd, (B, 512), 0, T // 2)
  got = block_lse(q, k, positions, block=block, scale=D ** -0.5, interpret=False,
                  doc_start=doc_start)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(block_lse_xla, static_argnums=(3, 4, 5))(
        q, positions, k, D ** -0.5, block, T // block, doc_start)
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(want)], want[~np.isinf(want)], rtol=1e-4, atol=1e-4)
