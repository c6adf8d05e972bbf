"""Epoch-end reports: analytics results as logger metrics, figures, tables and an HTML report."""

from mstore_lightning.reports.artifacts import ReportPaths, report_paths

__all__ = ["ReportPaths", "report_paths"]
