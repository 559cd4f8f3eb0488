"""Repository tools run with ``python -m`` (never as scripts inside the package)."""
