"""Optimisers and learning-rate schedules that torch does not ship (LAMB, cosine warm restarts)."""
