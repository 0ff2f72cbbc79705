"""Benchmarks of multirate_optax, kept out of the installed package.

Each module is a command: run it from the repository root as
``python -m benchmarks.<name>`` (``--help`` lists its options). Results
measured here are in ``benchmarks/results/``.
"""
