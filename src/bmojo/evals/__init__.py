"""Evaluations: synthetic recall (MQAR) and language-model benchmarks."""
