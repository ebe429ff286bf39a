"""Adapters on quantized bases (DiaBlo, LoRA) and their initialisations — see METHODS.md §2–3 (issue 4)."""
