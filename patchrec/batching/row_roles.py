"""The role of each row of a PerSRec prompt, as the dense reference mask reads them
(``patchrec.persrec.reference.persrec_mask``) and the reference packer writes them
(``patchrec.batching.pack_reference``): the shared prefix, an item or a T token of an old segment, or a row
of the recent block (recent items, suffix, answer)."""

PREFIX, ITEM, TOKEN, RECENT = 0, 1, 2, 3
