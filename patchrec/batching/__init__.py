"""From samples to packed batches: ``tokens`` (titles and prompt as token ids, history markers), ``plan``
(which history item is text, an item patch or part of a session patch), ``pack`` (padding-free batches for
``patch_embed`` and varlen attention) with its row-by-row ground truth ``pack_reference`` (PerSRec rows'
roles for the dense reference mask: ``row_roles``), ``tokenizer_train`` (a title BPE for data without a
tokenizer) and ``stats`` (a release's sizes and compression ratios: ``patchrec stats``)."""
