"""Benchmarks: ``python -m lightning_fhe.bench SUBCOMMAND``. Each measures ratios within one run."""
