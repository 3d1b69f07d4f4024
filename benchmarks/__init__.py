"""jaxreg benchmarks: ratios measured side by side in one run (see RESULTS.md)."""
