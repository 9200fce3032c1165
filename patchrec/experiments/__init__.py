"""Experiments built from the library's stages: the end-to-end demo on synthetic data (``demo``,
``patchrec demo``) and the paper's experiments on one backbone (``reproduce``, ``patchrec reproduce``, with
what they run in ``reproduce_settings``, their cost estimates in ``reproduce_estimate`` and their tables in
``reproduce_report``), sharing the "train a stage, evaluate a checkpoint" glue of ``stages``."""
