"""The package version (a leaf: the tuning keys read it without importing the package)."""

__version__ = "0.1.0"
