"""DataModules: image folders, LMDB databases, test-only sets and the built-in sample photos."""
