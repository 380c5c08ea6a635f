"""The model itself: InternLM2 checkpoints converted to Llama, tokenized, prompted in InternLM2's chat format,
loaded on a device."""
