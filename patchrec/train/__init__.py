"""Training: the step loop (``loop``), what a stage starts from (``stage_inputs``: device, data, init model,
tokenizer, subsets), its configuration (``config``), checkpoints (``checkpoint``), several processes
(``distributed``, ``parallel``: DDP / FSDP2) and the demo's catalog-text stage (``catalog_pretrain``)."""
