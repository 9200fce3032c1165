"""Reports computed from committed results: the PerSRec tables (``persrec_tables``) and the check that every
committed result and every table quoted in the docs is what its raw files give (``results_check``)."""
