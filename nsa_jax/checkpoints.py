"""Checkpoints of a training run: Orbax save and restore of the model, the optimizer and the
data loader's position, across layer layouts (`ModelConfig.scan_layers`); `load_model` for
evaluation and sampling. docs/api.md#training.
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from nsa_jax import data
from nsa_jax.model import Transformer, stack_layers, unstack_layers
from nsa_jax.train_config import TrainConfig, from_dict, to_dict


def checkpoint_manager(out_dir: pathlib.Path, keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (out_dir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save_checkpoint(manager, step: int, model, optimizer, loader: data.Loader,
                    cfg: TrainConfig, train_s: float) -> None:
  manager.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave(nnx.state(model)),
      optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
      loader=ocp.args.JsonSave(loader.state_dict()),
      meta=ocp.args.JsonSave({"step": step, "train_s": train_s, "config": to_dict(cfg)})))


def _abstract(module, relayout=None) -> nnx.State:
  """The restore target of `module`'s state; with `relayout` (a checkpoint of the other
  layer layout, `nsa_jax.model.stack_layers`) in that layout, replicated."""
  state = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(module))
  if relayout is None:
    return state
  sharding = jax.tree.leaves(state)[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(relayout, state))


def restore_checkpoint(manager, step: int, model, optimizer=None, loader=None) -> dict:
  """Loads a checkpoint into `model` (and `optimizer`, `loader` when given); returns its meta.

  A checkpoint of the other layer layout (`ModelConfig.scan_layers`) is converted on the way
  (`stack_layers` / `unstack_layers`); one of another number of layers is a ValueError, raised
  before any array is read. `remat` does not change the state.
  """
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  want = model.config   # a meta without config (written by hand) is taken as the model's
  saved = from_dict(meta["config"]).model if "config" in meta else want
  if saved.num_layers != want.num_layers:
    raise ValueError(f"checkpoint step {step} in {manager.directory} has num_layers="
                     f"{saved.num_layers}, the model num_layers={want.num_layers}: "
                     f"build the model with num_layers={saved.num_layers} or train anew")
  to_saved, from_saved = None, lambda state: state
  if saved.scan_layers != want.scan_layers:
    to_saved, from_saved = ((unstack_layers, stack_layers) if want.scan_layers else
                            (stack_layers, unstack_layers))
  modules = {"model": model, "optimizer": optimizer}
  modules = {name: m for name, m in modules.items() if m is not None}
  items = {name: ocp.args.StandardRestore(_abstract(m, to_saved)) for name, m in modules.items()}
  if loader is not None:
    items["loader"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  for name, m in modules.items():
    state = from_saved(restored[name])
    if to_saved is not None:   # onto the module's devices and shardings
      state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, nnx.state(m)))
    nnx.update(m, state)
  if loader is not None:
    loader.load_state_dict(restored["loader"])
  return meta


def load_model(out_dir, step: int | None = None) -> tuple[Transformer, TrainConfig, int]:
  """The model of a run's checkpoint (latest when `step` is None), for evaluation and sampling.

  Checkpoints written before the nested config (flat TrainConfig) do not load: ValueError.
  """
  where = pathlib.Path(out_dir) / "checkpoints"
  missing = f"no checkpoint under {where}: give the --out of a training run"
  if not where.is_dir():   # looked at before the manager, which would create it
    raise FileNotFoundError(missing)
  manager = checkpoint_manager(pathlib.Path(out_dir))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(missing)
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  cfg = from_dict(meta["config"])
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  restore_checkpoint(manager, step, model)
  manager.close()
  return model, cfg, step
