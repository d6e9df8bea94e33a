"""Pretraining support: synthetic training data generated inside the product (no external data)."""
