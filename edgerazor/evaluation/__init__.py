"""Benchmark evaluation: lm-evaluation-harness on our models, offline tasks, tables and plots."""
