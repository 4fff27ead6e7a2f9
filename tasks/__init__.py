"""Evaluation tasks (one module each, one registry) and metrics for fromage-bench."""
import importlib
import importlib.util

from .base import REGISTRY, RunContext, Skipped, Task, TaskResult, get_task, parse_protocols, parse_task_spec

# Importing a task module registers it. (Transitional: modules still being written are skipped.)
for _name in ("vist", "visdial", "image_text", "captioning"):
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["REGISTRY", "RunContext", "Skipped", "Task", "TaskResult", "get_task", "parse_protocols", "parse_task_spec"]
