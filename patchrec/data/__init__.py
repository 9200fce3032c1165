"""Datasets: the release format, raw MovieLens preprocessing, the synthetic default, and samples."""
