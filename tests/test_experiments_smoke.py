"""Smoke tests of the GPU scripts' --small mode on the CPU (experiments/).

Each script runs in a subprocess (its own jax settings, as on the device
machine) and must exit 0 and write its JSON with the records the lead reads.
The benchmark runs the XLA reference (interpret-mode Pallas compiles too slowly
for a smoke test; the kernels have their own tests); the check runs two ops
through the Pallas kernels in interpret mode, which is what it exists to do.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, args, out_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUMPY_RANK_PROMOTION="raise")
  env.pop("OUT", None)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", name), "--small",
       "--out", str(out_dir), *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_bench_kernels_small(tmp_path):
  stdout = run_script("bench_kernels.py", ["--quick", "--impl", "xla"], tmp_path)
  with open(tmp_path / "bench_kernels_cpu.json") as f:
    data = json.load(f)
  assert data["meta"]["jax_version"] and data["meta"]["gpu"] == "cpu"
  assert (tmp_path / "bench_kernels_cpu.png").stat().st_size > 0
  timed = {(r["op"], r["pass"]): r for r in data["records"]}
  for op, pass_ in [("nsa", "fwd"), ("nsa", "fwd+bwd"), ("dense", "fwd"), ("dense", "fwd+bwd"),
                    ("compressed_attention", "fwd+bwd"), ("select_blocks", "fwd"),
                    ("selected_attention", "fwd+bwd"), ("window_attention", "fwd+bwd")]:
    rec = timed[(op, pass_)]
    assert rec["median_ms"] > 0 and rec["n_iter"] >= 10, rec
    assert rec["floor_ms"] > 0, rec
  # NSA's fused floor counts the three attention branches, scoring not again.
  assert timed[("nsa", "fwd")]["flops"] == sum(
      timed[(op, "fwd")]["flops"] for op in
      ("compressed_attention", "selected_attention", "window_attention"))
  assert "speedup" in stdout


def test_gpu_check_small(tmp_path):
  run_script("gpu_check.py", ["--impl", "pallas", "--cases", "small-G2",
                              "--ops", "select_blocks,window_attention"], tmp_path)
  with open(tmp_path / "gpu_check_cpu.json") as f:
    data = json.load(f)
  assert data["impls"]["window_attention"] == "pallas"
  assert data["failed"] == 0
  quantities = {(r["op"], r["quantity"]) for r in data["rows"] if r["status"] == "PASS"}
  assert {("window_attention", q) for q in ("o", "dq", "dk", "dv")} <= quantities
  assert {("select_blocks", "block_idx"), ("select_blocks", "block_idx[xla]")} <= quantities


def test_bench_scaling_small(tmp_path):
  # 2 of the 8 host devices: every mode on 1 and 2 devices (a few compiles).
  run_script("bench_scaling.py", ["--max_devices", "2"], tmp_path)
  with open(tmp_path / "scaling.json") as f:
    data = json.load(f)
  assert data["meta"]["config"]["preset"] == "tiny"
  assert (tmp_path / "scaling.png").stat().st_size > 0
  batch = data["meta"]["config"]["per_device_batch"]
  for mode, scaling in (("data", "weak"), ("fsdp", "weak"), ("heads", "strong")):
    rows = data["results"][mode]
    assert [(r["mesh"], r["devices"]) for r in rows] == [(f"{mode}={n}", n) for n in (1, 2)]
    assert [r["batch"] for r in rows] == ([batch, 2 * batch] if scaling == "weak" else [batch] * 2)
    assert rows[0]["efficiency"] == 1.0
    for r in rows:
      assert r["step_ms"] > 0 and 4.0 < r["loss"] < 7.0, r   # ~ln(256) on random tokens


def test_profile_kernels_small(tmp_path):
  """One flash op and the decode step: checks against the reference, then the
  default tiles and a variant timed (interpret mode); every check passes."""
  run_script("profile_kernels.py", ["window", "--variants", "bwd-k128"], tmp_path)
  with open(tmp_path / "profile_window.json") as f:
    data = json.load(f)
  assert [c["dtype"] for c in data["checks"]] == ["float32", "bfloat16"]
  assert all(c["ok"] and set(c["errors"]) == {"o", "dq", "dk", "dv"} for c in data["checks"])
  assert data["timings"][0]["fwd_bwd_ms"] > 0 and data["variants"][0]["ok"]
  run_script("profile_kernels.py", ["decode", "--variants", "splits <= 16"], tmp_path)
  with open(tmp_path / "profile_decode.json") as f:
    rows = json.load(f)["timings"]
  assert [r["variant"] for r in rows] == ["default", "splits <= 16"]
  for r in rows:   # every variant's step agrees with the XLA one
    assert r["us_per_step"] > 0 and r["selection_agreement"] == 1.0 and r["o_rel_err"] < 1e-5, r


def test_shared_memory_small(tmp_path):
  """The shared-memory table (estimates only: no Triton wheel here): Config B's
  block-major dK/dV tiles were over Hopper's budget before fitting, none is after."""
  run_script("shared_memory.py", [], tmp_path)
  with open(tmp_path / "shared_memory.json") as f:
    rows = json.load(f)["rows"]
  over = [r for r in rows if r["estimate_before"] > r["budget"]]
  assert [(r["kernel"], r["Dk"]) for r in over] == [("block_dkv block-major", 192)]
  assert all(r["estimate"] <= r["budget"] for r in rows)


def test_gpu_check_compare_empty_output():
  """T < l gives a zero-size compressed branch (Tc = 0): gpu_check's error
  measures must still be defined (its max-relative error once raised here)."""
  import importlib
  import jax.numpy as jnp
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  try:
    gpu_check = importlib.import_module("gpu_check")
  finally:
    sys.path.pop(0)
  err, max_rel, ok = gpu_check.compare(jnp.zeros((1, 0, 2, 16)), jnp.zeros((1, 0, 2, 16)))
  assert float(err) == 0.0 and float(max_rel) == 0.0 and bool(ok)
