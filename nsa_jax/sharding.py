"""Training on a mesh of devices: `jax.jit` shardings of the model, optimizer and batches.

The mesh has four named axes, any of size 1 (docs/api.md#meshes): ``data`` (batch split),
``fsdp`` (batch and large parameters split; XLA gathers a weight before use and
reduce-scatters its gradient), ``context`` (sequences split along T) and ``heads`` (attention
heads split); the NSA op per shard is `nsa_jax.context.sharded_nsa`. Parameter placement
is a path-based rule table (`PARAM_RULES`), which the optimizer moments follow. Several
hosts: call `setup_distributed()` first in every process, which then builds the same mesh and
feeds its own rows through `shard_batch`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nsa_jax.context import AXES, BATCH_AXES, CONTEXT

# First matching rule wins. The pattern is searched in the parameter's path
# ("blocks/0/attn/q_proj/kernel"; optimizer moments have a prefix such as
# "opt_state/0/mu/"); the spec names a mesh axis (or None) per dimension.
# q_proj, kv_proj and the gate are head-major in their output columns
# (reshaped to [.., HQ, Dk], [.., HKV, branches, Dk + Dv] (FullAttention:
# [.., HKV, 2, D]) and [.., HQ, 3]), o_proj in its input rows, so splitting
# those dimensions over "heads" splits whole heads and the NSA op's inputs are
# computed where `context.sharded_nsa` needs them. The SwiGLU's columns are
# [gate | up], not heads: it only takes "fsdp".
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/(q_proj|kv_proj|gate)/kernel$", ("fsdp", "heads")),
    (r"attn/gate/bias$", ("heads",)),
    (r"attn/o_proj/kernel$", ("heads", "fsdp")),
    (r"(kernel|embedding)$", ("fsdp", None)),
)
# Blocks stacked on a leading layer axis (`ModelConfig.scan_layers`: "blocks/attn/..", not
# "blocks/0/attn/.."): that axis stays whole, the rules place the rest.
STACKED_LAYERS = r"(^|/)blocks/(?!\d+/)"


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
  """"data=2,heads=2" -> {"data": 2, "fsdp": 1, "context": 1, "heads": 2}; one axis may be -1
  ("the rest")."""
  if isinstance(spec, str):
    sizes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
      name, sep, value = item.partition("=")
      try:
        sizes[name.strip()] = int(value)
      except ValueError:
        raise ValueError(f"mesh spec {spec!r}: {item!r} is not axis=size") from None
      if not sep:
        raise ValueError(f"mesh spec {spec!r}: {item!r} is not axis=size")
  else:
    sizes = dict(spec)
  unknown = sorted(set(sizes) - set(AXES))
  if unknown:
    raise ValueError(f"mesh spec {spec!r}: unknown axes {unknown}; axes are {AXES}")
  bad = {k: v for k, v in sizes.items() if v < 1 and v != -1}
  if bad or list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh spec {spec!r}: sizes must be >= 1, with at most one -1")
  return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices=None) -> Mesh:
  """A Mesh with axes `AXES` over `devices` (default: all devices of all hosts).

  The sizes must multiply to the number of devices; a -1 axis takes what is left.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = parse_mesh(spec)
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for axis, size in sizes.items():
    if size == -1:
      if len(devices) % known:
        raise ValueError(f"mesh spec {spec!r}: {len(devices)} devices are not a multiple "
                         f"of the other axes' product {known}")
      sizes[axis] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh spec {spec!r} -> {sizes} needs {int(np.prod(list(sizes.values())))} "
                     f"devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def setup_distributed() -> int:
  """Starts JAX's distributed runtime when this is one process of several; returns the process count.

  Call it before anything touches a device. Two ways to launch, one process per host:

  * explicit: ``JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0|1>
    python experiments/train.py --mesh data=-1 ...`` on every host;
  * SLURM / Open MPI: ``srun -N 2 --ntasks-per-node=1 python experiments/train.py ...``
    (jax detects the cluster; ``JAX_NUM_PROCESSES`` unset).

  A single process (none of those variables set) is left alone.
  """
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    jax.distributed.initialize(coordinator, int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(
      os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
  return jax.process_count()


# ----------------------------------------------------------------------------
# Placement of parameters, optimizer state and batches.


def _path_name(path) -> str:
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  return name.removesuffix("/value")


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of the parameter (or optimizer moment) at path `name`.

  An axis that does not divide its dimension is dropped (that dimension is
  replicated), so any model shape works on any mesh.
  """
  if re.search(STACKED_LAYERS, name):
    rest = param_spec(name.replace("blocks/", "blocks/0/", 1), shape[1:], mesh)
    return P(None, *rest) if rest else P()
  for pattern, spec in PARAM_RULES:
    if re.search(pattern, name) and len(spec) <= len(shape):
      return P(*(axis if axis and dim % mesh.shape[axis] == 0 else None
                 for axis, dim in zip(spec, shape)))
  return P()


def state_shardings(state, mesh: Mesh):
  """NamedShardings (same tree as `state`: an nnx.State, arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(_path_name(path), x.shape, mesh)), state)


def abstract_state(state, mesh: Mesh):
  """ShapeDtypeStructs of `state` placed on `mesh`: the Orbax restore target for that mesh.

  A checkpoint saved on one mesh restores onto another (say data=4,heads=2 ->
  data=8) by passing this to `ocp.args.StandardRestore`.
  """
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows [B, T] split over ("data", "fsdp"), their tokens over "context"."""
  return NamedSharding(mesh, P(BATCH_AXES, CONTEXT))


def shard_batch(batch, mesh: Mesh):
  """A global batch (pytree of numpy arrays, rows first) as jax arrays split over the batch axes.

  Every process passes the same global batch (the loader is deterministic and
  cheap) and places only the rows of its own devices, so the loader's
  checkpointed position means the same thing on every host.
  """
  sharding = batch_sharding(mesh)
  rows, chunks = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape[CONTEXT]
  for x in jax.tree.leaves(batch):
    if x.shape[0] % rows:
      raise ValueError(f"batch of {x.shape[0]} rows does not split over "
                       f"data*fsdp={rows} devices: use a multiple of {rows}")
    if x.ndim < 2 or x.shape[1] % chunks:
      raise ValueError(f"batch arrays of shape {x.shape} do not split along T over "
                       f"context={chunks} devices: use a sequence length that is a "
                       f"multiple of {chunks}")
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), batch)


def shard_model_and_optimizer(model: nnx.Module, optimizer: nnx.Optimizer | None,
                              mesh: Mesh) -> None:
  """Places parameters and optimizer state on `mesh` (in place) and runs NSA layers shard_mapped.

  Call it right after building them and before restoring a checkpoint: the
  restore then targets these shardings (the abstract state keeps them).
  """
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "mesh"):   # layers that run their op per shard: NativeSparseAttention
      module.mesh = mesh
  target = model if optimizer is None else (model, optimizer)
  state = nnx.state(target)
  nnx.update(target, jax.device_put(state, state_shardings(state, mesh)))
