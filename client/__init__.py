"""Typed Python client of the StreamFlow PredictionService and its CLI."""
