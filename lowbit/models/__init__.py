"""Model builders: small LLaMA models and tokenizers made locally (no hub access needed)."""
