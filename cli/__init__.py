"""`gpt2-engine`, the command line: the composition root.

The one package that may import every other part (engine, export, benchmarks, server); nothing
imports it. The bench commands' click code is here too (cli/bench.py), over the harness in benchmarks/.
"""
