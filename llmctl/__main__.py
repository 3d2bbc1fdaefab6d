"""`python -m llmctl` is the same as the `llmctl` console script."""

from llmctl.cli import main

main()
