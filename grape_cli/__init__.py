"""grape: CLIP photo search with an LLM query rewriter tuned by GRPO (GRAPE, arXiv 2509.23370)."""

__version__ = "0.1.0"
