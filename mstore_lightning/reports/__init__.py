"""Epoch-end reports: analytics results as logger metrics, figures, tables and an HTML report.

Imports the facade and everything below it; only ``callbacks`` and the CLI import it.
"""

from mstore_lightning.reports.artifacts import ReportPaths, report_paths
from mstore_lightning.reports.html import write_report

__all__ = ["ReportPaths", "report_paths", "write_report"]
