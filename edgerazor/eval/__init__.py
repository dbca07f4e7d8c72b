"""Evaluation helpers: held-out perplexity."""

from edgerazor.eval.perplexity import perplexity

__all__ = ["perplexity"]
