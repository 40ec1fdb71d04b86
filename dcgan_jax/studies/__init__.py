"""Reproducibility studies over finished runs: the table of runs grouped by their settings
(study_table.py), its statistics (study_stats.py: confidence intervals, tests) and the HTML report
(study_report.py). No JAX."""
