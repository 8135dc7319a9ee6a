"""Overrides for short pretraining runs in tests whose subject is not the end-of-run probe.

The end-of-run comparison (the run's encoder, the same architecture at random init and the raw-input
baseline, each with C chosen by 5-fold cross-validation) adds about 9 s to a run on a slow 2-core
machine (a 10-update tiny run: 25 s with it, 16 s without), far more than its updates take. The
tests that check that comparison (`test_eval.py`, `test_probe_curve.py`) keep it; the ones that use
this list keep the probe callback and its final probe, at a fixed C.
"""

NO_PROBE_COMPARISON = [
    "callbacks.probe.compare_random_init=false",
    "callbacks.probe.compare_baseline=false",
    "callbacks.probe.final_C=1",
]
