"""Drivers: quantize, finetune, evaluate, demo, pretrain-tiny; their configs, the shared model loader, and the
built-in YAML recipes (``configs/``). ``lowbit.cli`` parses arguments into these configs and calls the drivers."""
