"""Runtimes for exported models: the packed PyTorch runtime and text generation."""
