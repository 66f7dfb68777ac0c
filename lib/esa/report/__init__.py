"""Figures, tables, the scorecard of the research guide's success criteria, and the run index."""
