"""The decoder on the packed path and what it is made of:

- ``backbone``: which decoder families run exactly (Llama, Qwen2, Qwen3, Mistral, Gemma 3, Gemma 2 without
  attention soft-capping) and loading one from a Hugging Face directory or a GGUF file;
- ``attention``: patchrec's registered attention function and its plans (packed varlen, blocks with a cached
  context, continuations of a cached prompt), the one place where special attention happens;
- ``decoder``: ``PackedDecoder`` (alias ``PackedLlama``), the model's own transformers layers on packed rows:
  the one decoder call for training, ranking, beam search and PerSRec;
- ``lora``: LoRA adapters through ``peft`` (optional extra ``patchrec[peft]``).
"""
