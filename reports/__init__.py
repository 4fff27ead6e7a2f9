"""HTML reports of fromage-bench runs: `write_report(run_dir)` turns `run_dir/results.json` (and the
predictions it points to) into one self-contained `run_dir/report.html` (inline CSS, plots and thumbnails
as data URIs, no JavaScript, no external resources)."""
from .html import main_report, render_report, write_report

__all__ = ["main_report", "render_report", "write_report"]
