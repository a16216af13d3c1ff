"""Reports: HTML for one run, tables and figures across runs."""
