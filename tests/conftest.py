"""Test-wide JAX settings: no silent broadcasting; float64 available for gradient checks."""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)
