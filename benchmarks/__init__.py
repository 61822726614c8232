"""Benchmarks: speed and memory targets, each measured side by side with its baseline in one run."""
