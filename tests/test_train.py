"""Training: bit-for-bit resume after a crash, checkpoints, NaN guard, outputs (process 0
only), the end-of-run sample and message. (The configuration: test_train_config.py.)"""
import csv
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import checkpoints, sampling, train_lib
from nsa_jax.train_config import make_config
from nsa_jax.checkpoints import checkpoint_manager, load_model
from nsa_jax.train_lib import NonFiniteError, sample, train
from tests import rand


def tiny(tmp_path, name, **kw):
  kw = {"steps": 8, "ckpt_every": 4, "eval_every": 4, "keep_checkpoints": 2, **kw}
  return make_config("tiny", out=str(tmp_path / name), progress=False, **kw)


def params(run_dir):
  model, _, step = load_model(run_dir)
  return step, jax.tree.leaves(nnx.state(model, nnx.Param))


def test_crash_and_resume_reproduce_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
  straight = train(tiny(tmp_path, "straight"))
  assert (f"no checkpoint in {tmp_path / 'straight' / 'checkpoints'}: training from scratch"
          in capsys.readouterr().out)
  crashed = train(tiny(tmp_path, "resumed"), crash_after_step=6)  # dies after step 6
  resumed = train(tiny(tmp_path, "resumed"))                      # restarts from step 4
  assert [r["step"] for r in straight] == list(range(1, 9))
  assert [r["step"] for r in crashed] == list(range(1, 7))
  assert [r["step"] for r in resumed] == [5, 6, 7, 8]
  losses = lambda rows, key: [r.get(key) for r in rows]
  for key in ("loss", "grad_norm", "val_text", "val_passkey", "val_mqar"):
    assert losses(crashed[:4] + resumed, key) == losses(straight, key), key
  assert straight[-1]["loss"] < straight[0]["loss"]

  (step_a, a), (step_b, b) = params(tmp_path / "straight"), params(tmp_path / "resumed")
  assert step_a == step_b == 8
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)

  run = tmp_path / "resumed"
  assert checkpoint_manager(run).all_steps() == [4, 8]  # keep the last 2
  with open(run / "metrics.csv") as f:
    assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))
  assert (run / "loss.png").stat().st_size > 0
  assert list((run / "tb").glob("events.out.tfevents.*"))

  # Each call compiles before its first step, whose row alone says how long that took.
  compiled = [r for r in straight + crashed + resumed if "compile_s" in r]
  assert [r["step"] for r in compiled] == [1, 1, 5] and all(r["compile_s"] > 0 for r in compiled)

  model, _, _ = load_model(run)
  text = sample(model, b"def ", 6)
  assert len(text) == 10 and text.startswith(b"def ")

  # The finished run again: nothing to train, a sample through sampling.generate, and where
  # everything is.
  calls = []
  generate = sampling.generate
  monkeypatch.setattr(sampling, "generate", lambda *a, **kw: calls.append(kw) or generate(*a, **kw))
  capsys.readouterr()
  train_lib.main(cli_args(tiny(tmp_path, "resumed"), "--sample_tokens", "6"))
  out = capsys.readouterr().out
  assert [c["max_new_tokens"] for c in calls] == [6]
  assert "nothing to train" in out and "--- sample from the step-8 checkpoint" in out
  for what in ("checkpoints/", "tb/", "-m tensorboard.main --logdir",
               f"-m experiments.eval_retrieval --run {run}",
               f"-m experiments.train --preset tiny --out {run}", "--sample_prompt"):
    assert what in out, (what, out)
  assert ("pip install tensorboard" in out) == (importlib.util.find_spec("tensorboard") is None)
  # The printed sampling command, as pasted (this interpreter for the one it names).
  [command] = [line for line in out.splitlines() if " -c " in line]
  _, flag, code = shlex.split(command)
  proc = subprocess.run([sys.executable, flag, code], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("def "), proc.stderr[-2000:]


def cli_args(cfg, *more):
  """The command line of `tiny(...)`'s configuration."""
  flags = ("steps", "ckpt_every", "eval_every", "keep_checkpoints")
  return ["--preset", "tiny", "--out", cfg.out, "--progress", "false",
          *[f"--{k}={getattr(cfg, k)}" for k in flags], *more]


def test_failures_leave_no_directory_behind(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint under .*typo/checkpoints"):
    load_model(tmp_path / "typo")
  with pytest.raises(ValueError, match="mesh spec 'data=3'"):   # one CPU device
    train(tiny(tmp_path, "meshed", mesh="data=3"))
  assert list(tmp_path.iterdir()) == []


def test_other_processes_write_nothing_but_checkpoints(tmp_path, monkeypatch, capsys):
  """As process 1 of a multi-host run: the run and its checkpoints as usual, no files or prints."""
  monkeypatch.setattr(train_lib, "is_process_0", lambda: False)
  cfg = tiny(tmp_path, "process1")      # the first test's configuration: its compiled steps
  # no compilation cache: JAX writes it from its process 0 only, which this process is to JAX
  train_lib.main(cli_args(cfg, "--compile_cache", ""))
  assert checkpoint_manager(cfg.out_dir).all_steps() == [4, 8]
  assert sorted(p.name for p in cfg.out_dir.iterdir()) == ["checkpoints"]
  assert capsys.readouterr().out == ""


def test_metrics_without_tensorboardx(tmp_path, monkeypatch, capsys):
  """The GPU image has no tensorboardX: the log writes its CSV and plot, no events, and says so."""
  monkeypatch.setitem(sys.modules, "tensorboardX", None)   # makes the import fail
  log = train_lib.MetricsLog(tmp_path, ["step", "loss"], 0, {"preset": "tiny"})
  log.log({"step": 1, "loss": 5.5})
  log.log({"step": 2, "loss": 5.0})
  assert log.plot().stat().st_size > 0
  log.close()
  with open(tmp_path / "metrics.csv") as f:
    assert [float(r["loss"]) for r in csv.DictReader(f)] == [5.5, 5.0]
  assert not (tmp_path / "tb").exists()
  assert "tensorboardX is not installed" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = tiny(tmp_path, "nan", attention="full", lr=1e30, warmup_steps=1, ckpt_every=1)
  with pytest.raises(NonFiniteError, match=r"step \d+: loss=.* is not finite") as err:
    train(cfg)
  bad = int(re.search(r"step (\d+):", str(err.value)).group(1))
  assert 1 < bad <= 8
  assert f"Last good checkpoint: step {bad - 1}" in str(err.value)
  assert checkpoint_manager(cfg.out_dir).latest_step() == bad - 1


def test_train_step_donates_its_state(tmp_path):
  """The compiled step writes the new state into the buffers of the one passed in
  (peak memory holds parameters and moments once): every input buffer is consumed."""
  from nsa_jax import data
  from nsa_jax.model import Transformer
  cfg = tiny(tmp_path, "donate", attention="full")   # as NSA does; full compiles faster
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  graphdef, state = nnx.split((model, train_lib.make_optimizer(model, cfg)))
  batch = next(data.Loader(cfg.mixture, **cfg.data_options()))
  new_state, metrics = train_lib.make_steps(graphdef)[0](state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert all(x.is_deleted() for x in jax.tree.leaves(state))
  assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))


def build(cfg, seed):
  """A model and optimizer of `cfg`, every float leaf of the optimizer's state set apart
  (moments of different values in each layer) so that relayouts show in it."""
  from nsa_jax.model import Transformer
  model = Transformer(cfg.model, rngs=nnx.Rngs(seed))
  optimizer = train_lib.make_optimizer(model, cfg)
  leaves, treedef = jax.tree.flatten(nnx.state(optimizer))
  nnx.update(optimizer, jax.tree.unflatten(treedef, [
      rand.normal(rand.key(seed * 1000 + i), x.shape, x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else x for i, x in enumerate(leaves)]))
  return model, optimizer


@pytest.mark.parametrize("saved_scan", [False, True])
def test_checkpoints_restore_across_layer_layouts(tmp_path, saved_scan):
  """Model and optimizer saved with scan_layers=saved_scan restore into the other layout (the
  same values, stacked or unstacked); another layer count is refused, naming both."""
  from nsa_jax import data
  from nsa_jax.model import stack_layers, unstack_layers
  cfg = tiny(tmp_path, "layout", num_layers=2, scan_layers=saved_scan)
  model, optimizer = build(cfg, seed=1)
  manager = checkpoint_manager(cfg.out_dir)
  checkpoints.save_checkpoint(manager, 4, model, optimizer,
                            data.Loader(cfg.mixture, **cfg.data_options()), cfg, 0.0)
  manager.wait_until_finished()

  other = tiny(tmp_path, "layout", num_layers=2, scan_layers=not saved_scan)
  target, target_opt = build(other, seed=2)
  relayout = unstack_layers if saved_scan else stack_layers
  for module, saved in ((target, model), (target_opt, optimizer)):
    assert any(np.any(x != y) for x, y in zip(jax.tree.leaves(nnx.state(module)),
                                              jax.tree.leaves(relayout(nnx.state(saved)))))
  checkpoints.restore_checkpoint(manager, 4, target, target_opt)
  for module, saved in ((target, model), (target_opt, optimizer)):
    jax.tree.map(np.testing.assert_array_equal, nnx.state(module), relayout(nnx.state(saved)))

  fewer, _ = build(tiny(tmp_path, "layout", num_layers=1), seed=0)
  with pytest.raises(ValueError, match=r"has num_layers=2, the model num_layers=1"):
    checkpoints.restore_checkpoint(manager, 4, fewer)


def test_a_later_start_reads_the_compile_cache(tmp_path):
  """The first run fills <out>/jax_cache; a later start (nothing compiled in memory), cache
  given by name, reads every program from it and writes nothing new. JAX's settings are
  back after each run. (Full attention: the cache's use does not depend on the attention, and
  its programs compile faster; NSA's step read from the cache in a fresh process:
  tests/test_experiments_smoke.py::test_bench_train_small.)"""
  cfg = tiny(tmp_path, "cache", attention="full", steps=2, warmup_steps=1, eval_every=2,
             ckpt_every=2)
  jax.clear_caches()   # every program of the run compiled (and cached) by it
  train(cfg)
  cache = cfg.out_dir / "jax_cache"
  entries = set(os.listdir(cache))
  assert entries and jax.config.jax_compilation_cache_dir is None
  hits = []
  listener = lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else None
  jax.monitoring.register_event_listener(listener)
  jax.clear_caches()
  try:
    train(dataclasses.replace(cfg, out=str(tmp_path / "again"), compile_cache=str(cache)))
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert hits and set(os.listdir(cache)) == entries
  assert not (tmp_path / "again" / "jax_cache").exists()


def test_unwritable_compile_cache_is_refused_before_anything_runs(tmp_path):
  (tmp_path / "file").write_text("")
  cfg = tiny(tmp_path, "nocache", compile_cache=str(tmp_path / "file" / "cache"))
  with pytest.raises(ValueError, match=r"compile_cache='.*/file/cache': cannot write to"):
    train(cfg)
  assert not cfg.out_dir.exists()
