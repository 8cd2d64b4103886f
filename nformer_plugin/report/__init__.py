"""Ranked-list report page (``nformer report``; ``TEST.REPORT.ENABLED`` at evaluation)."""
from .page import write_report
from .ranking import categorize, query_rankings

__all__ = ["write_report", "query_rankings", "categorize"]
