"""DataModules: image folders, the built-in sample photos (LMDB in a later step)."""
