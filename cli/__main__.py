"""`python -m cli ARGS` == `gpt2-engine ARGS` (the tests run the CLI this way, in a subprocess)."""

from cli.main import main

main()
