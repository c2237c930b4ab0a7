"""Data pipelines, training loops and evaluation for MiniGPT."""
