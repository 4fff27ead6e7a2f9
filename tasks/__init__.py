"""Evaluation tasks (one module each, one registry) and metrics for fromage-bench."""
from .base import REGISTRY, RunContext, Skipped, Task, TaskResult, get_task, parse_protocols, parse_task_spec

# Importing a task module registers it.
from . import captioning, image_text, visdial, vist  # noqa: E402,F401

__all__ = ["REGISTRY", "RunContext", "Skipped", "Task", "TaskResult", "get_task", "parse_protocols", "parse_task_spec"]
