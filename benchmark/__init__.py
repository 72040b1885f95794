"""Benchmarks: inference speed per mode (``benchmark.py`` over :mod:`benchmark.speed`), training speed
(``train_speed.py``) and the dataset pre-check's cost (``dataset_check.py``). Run as scripts; see README.md."""
