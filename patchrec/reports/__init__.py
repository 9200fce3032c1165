"""Reports computed from committed results: the PerSRec tables (``persrec_tables``), the check that every
committed result and every table quoted in the docs is what its raw files give (``results_check``), and the
benchmark report (``bench_report``: pytest-benchmark JSON -> ratio tables and plots)."""
