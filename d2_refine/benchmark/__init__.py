"""The shapes benchmark behind ``tools/benchmark_table.py`` and ``tools/verdict_table.py``, one job per module:

- :mod:`.entries`: the models (config, baseline, variants), the two regimes and the schedule;
- :mod:`.runs`: run folders, training with ``train_net.py``, scoring and timing checkpoints, the job pool;
- :mod:`.record`: the results record (JSON): read, check, merge under a lock, one record per (model, seed);
- :mod:`.stats`: the aggregation over seeds: mean ± std, the paired Δ to the baseline, the verdict;
- :mod:`.report`: the Markdown tables (per model; per method in both regimes) and their JSON.

Only :mod:`.runs` needs detectron2 (imported where a run trains or is scored); the rest is plain Python.
"""
