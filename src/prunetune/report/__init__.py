"""Run reports: the comparison table printed at the end of a run and report.md with plots (Light-PEFT runs
and PrunePEFT searches)."""
from .search import write_search_report
from .summary import summary_rows, summary_table
from .write import write_report

__all__ = ["summary_rows", "summary_table", "write_report", "write_search_report"]
