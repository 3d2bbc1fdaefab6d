"""llmctl: from raw web crawl to an evaluated, aligned chat model, one command per stage."""

__version__ = "0.1.0"
