"""Benchmark harness: glm-gateway against nginx and direct access to the simulated engine."""
