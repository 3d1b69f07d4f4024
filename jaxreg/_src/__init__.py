"""Implementation modules; the public API is re-exported from ``jaxreg`` and its namespaces."""
