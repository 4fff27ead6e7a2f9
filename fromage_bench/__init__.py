"""fromage-bench: the harness (CLI, runner, profiler, results) around the FROMAGe stack in `model/`."""
__version__ = "0.1.0"
