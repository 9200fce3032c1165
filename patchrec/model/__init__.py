"""The Llama decoder on the packed path (``llama``: ``PackedLlama``) and loading a pretrained backbone from a
Hugging Face directory or a GGUF file (``backbone``)."""
