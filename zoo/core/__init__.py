"""Layer 0: specs, errors, paths and file I/O. Imports no torch and nothing else from zoo."""

__version__ = "0.1.0"
