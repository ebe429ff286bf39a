"""Evaluation: perplexity now; the Math10K benchmark protocol (answer extraction, batched generation) later."""
