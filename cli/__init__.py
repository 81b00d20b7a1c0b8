"""`gpt2-engine`, the command line: the composition root.

The one package that may import every other part (engine, export, benchmarks, server); nothing
imports it but `benchmarks.cli`, for the shared one-line error decorator in `cli.errors`.
"""
