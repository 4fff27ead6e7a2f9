"""Evaluation tasks and metrics for fromage-bench."""
