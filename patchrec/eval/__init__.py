"""Evaluation: whole-catalog ranking (``evaluate``) by exact title log-likelihoods (``exact``) or constrained
beam search (``beam``), and the metrics HR@K / NDCG@K with their results files (``metrics``)."""
