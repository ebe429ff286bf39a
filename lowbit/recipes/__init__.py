"""Fine-tuning recipes and their YAML configs (issue 5)."""
