"""Training: the step loop (``loop``), its configuration (``config``), checkpoints (``checkpoint``), several
processes (``distributed``, ``parallel``: DDP / FSDP2) and the demo's catalog-text stage
(``catalog_pretrain``)."""
