"""Test-wide JAX settings (no silent broadcasting; float64 available for gradient
checks) and fixtures shared by test files."""
import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def cudnn_calls(monkeypatch):
  """Sends jax's cuDNN attention call to its XLA implementation (no cuDNN on a
  CPU), so that the code around the call runs as on a GPU. Returns the list of
  the calls' query shapes, appended as they are traced."""
  calls = []
  dpa = jax.nn.dot_product_attention

  def on_xla(q, *a, implementation, **kw):
    calls.append(q.shape)
    return dpa(q, *a, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
  return calls
