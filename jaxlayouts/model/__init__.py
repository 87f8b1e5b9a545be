"""The Flax LLaMA: ``llama.Llama`` and its attention implementations."""
