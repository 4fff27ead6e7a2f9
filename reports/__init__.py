"""HTML reports of fromage-bench runs (not built yet: see the runner issue)."""
