"""Evaluation: metrics (loss, perplexity, bits per byte, exact match, accuracy) and batched greedy generation."""
