"""Rebuild a run's report (tables, curves, summary.json) from its run directory alone."""

from mopd.report.build import build_report
from mopd.report.scores import normalized_score, recovery

__all__ = ["build_report", "normalized_score", "recovery"]
