"""Metrics, baselines and rate-distortion evaluation."""
