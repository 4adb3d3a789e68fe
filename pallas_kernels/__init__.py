"""Pallas (Triton lowering) kernels of the NSA ops; references live in nsa_jax/ops."""
