"""The experiment scripts (benchmarks, GPU checks, training comparisons) as one package.

Run them from the repository root as modules, `python -m experiments.bench_train`, or as
`PYTHONPATH=. python experiments/bench_train.py`; they import each other as
`from experiments import bench_common as bc`. Shared helpers live in bench_common.py.
"""
