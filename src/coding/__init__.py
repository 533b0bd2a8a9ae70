"""Byte-level coding shared by every codec: the container format and its checks."""
