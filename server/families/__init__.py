"""Adapter families: one module per family behind one protocol, and the registry that owns
adapter names, tiers and pins."""
