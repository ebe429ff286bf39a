"""Shared by the tests that load lowbit's GPTQ checkpoints in GPTQModel / transformers."""

import torch


def fp32_scales(model) -> int:
    """Cast the GPTQ kernels' scales to float32; returns how many kernels. GPTQModel's torch kernel dequantizes in its
    scales' dtype (fp16 as loaded), which rounds ``s·(q − z)``; in float32 its weights are lowbit's exactly."""
    n = 0
    for m in model.modules():
        if hasattr(m, "dequantize_weight") and isinstance(getattr(m, "scales", None), torch.Tensor):
            m.scales = m.scales.float()
            getattr(m, "_cached_weights", {}).clear()
            n += 1
    return n
