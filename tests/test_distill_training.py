"""Training with the selection distillation loss (`ModelConfig.select_distill`,
docs/selection_learning.md "Training"): what reaches the gradient, and that a weight of 0
costs nothing. (The loss itself: nsa_jax.ops.distill's tests.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import data, train_lib
from nsa_jax.model import ModelConfig, Transformer
from nsa_jax.train_config import make_config


def tiny(**model):
  cfg = make_config("tiny", progress=False, mixture="passkey:0.5,text:0.5")
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, impl="xla", **model))


def batch(cfg):
  return {k: jnp.asarray(v) for k, v in next(data.Loader(cfg.mixture,
                                                          **cfg.data_options())).items()}


def test_select_distill_must_not_be_negative():
  with pytest.raises(ValueError, match="select_distill=-0.5 must be >= 0"):
    ModelConfig(select_distill=-0.5)


def test_select_distill_stride_must_be_a_positive_int():
  for bad in (0, 2.0):
    with pytest.raises(ValueError, match=f"select_distill_stride={bad!r} must be an int >= 1"):
      ModelConfig(select_distill_stride=bad)


def test_each_layer_computes_the_loss_at_the_configured_query_stride(monkeypatch):
  """select_distill_stride reaches the NSA layers' loss as its query_stride (traced only;
  the blocks share one trace, `Transformer.run_blocks`)."""
  from nsa_jax.ops import distill
  strides = []
  real = distill.selection_distill_loss
  def recorded(*args, **kwargs):
    strides.append(kwargs["query_stride"])
    return real(*args, **kwargs)
  monkeypatch.setattr(distill, "selection_distill_loss", recorded)
  cfg = tiny(select_distill=1.0, select_distill_stride=4, num_layers=2)
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  b = batch(cfg)
  jax.eval_shape(lambda: model(b["inputs"], distill=True))
  assert strides and set(strides) == {4}


def test_the_distillation_gradient_reaches_the_compression_mlp_and_the_queries():
  """The loss is computed from the layer's own q and k_cmp: its gradient alone moves
  phi_k (the compressed keys) and q_proj in every layer."""
  cfg = tiny(select_distill=1.0, num_layers=2)
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  b = batch(cfg)

  @nnx.jit   # the gradient and its norms in one compile (not the norms op by op)
  def norms(model):
    grads = nnx.grad(lambda m: train_lib.loss_sums(m, b)[2])(model)
    return [[optax_norm(grads["blocks"][layer]["attn"][name]) for name in ("phi_k", "q_proj")]
            for layer in range(2)]
  got = norms(model)
  for layer in range(2):
    for i, name in enumerate(("phi_k", "q_proj")):
      norm = float(got[layer][i])
      assert norm > 0 and np.isfinite(norm), (layer, name, norm)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_weight_zero_does_not_trace_the_loss(monkeypatch):
  """select_distill = 0: the step never calls the loss (nothing traced, no "distill" metric)."""
  def forbidden(*args, **kwargs):
    raise AssertionError("selection_distill_loss traced with select_distill=0")
  monkeypatch.setattr("nsa_jax.ops.distill.selection_distill_loss", forbidden)
  cfg = tiny()
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split((model, train_lib.make_optimizer(model, cfg)))
  _, metrics = train_lib.make_steps(graphdef)[0](state, batch(cfg))
  assert set(metrics) == {"loss", "grad_norm"}


def test_the_step_adds_the_weighted_distillation_loss():
  """train_step's gradient is that of loss + weight * distill, the weight rising over
  distill_warmup_steps (`train_lib.distill_weight`); both terms are in the metrics."""
  cfg = tiny(select_distill=0.5)
  b = batch(cfg)
  assert train_lib.distill_weight(0.5, 4, 0) == 0.125
  assert train_lib.distill_weight(0.5, 4, 9) == 0.5 == train_lib.distill_weight(0.5, 0, 0)
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))

  @nnx.jit
  def expected(m, weight):
    def total(m):
      s, n, distill = train_lib.loss_sums(m, b)
      return s / n + weight * distill, (s / n, distill)
    grads, (loss, distill) = nnx.grad(total, has_aux=True)(m)
    return loss, distill, optax_norm(nnx.state(grads, nnx.Param))

  graphdef, state = nnx.split((model, train_lib.make_optimizer(model, cfg)))
  # At step 0 of a 4-step warm-up the step weighs the loss by distill_weight(0.5, 4, 0):
  # the step reads the schedule (asserted above) at its own step count.
  loss, distill, grad_norm = expected(model, 0.125)
  _, metrics = train_lib.make_steps(graphdef, 4)[0](state, b)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["distill"], distill, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)


def test_scanned_and_rematerialized_blocks_give_the_same_distillation_loss():
  """The loss comes out of `run_blocks` in every layout: a loop, a scan over stacked
  blocks (scan_layers), each block rematerialized (remat)."""
  cfg = tiny(select_distill=1.0, num_layers=2)
  b = batch(cfg)
  distill = nnx.jit(lambda m: train_lib.loss_sums(m, b)[2])
  plain = distill(Transformer(cfg.model, rngs=nnx.Rngs(0)))
  model = dataclasses.replace(cfg.model, scan_layers=True, remat="layer")
  scanned = distill(Transformer(model, rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(scanned, plain, rtol=1e-5)
