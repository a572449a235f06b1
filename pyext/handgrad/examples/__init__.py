"""Runnable examples: python -m handgrad.examples.<name>."""
