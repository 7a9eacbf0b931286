"""Model files: the config, readers per checkpoint format (HF safetensors, GGUF, packed), the
packed layout shared by every backend, the tokenizer with chat templates, and the loader."""
