"""The analytical memory model of ``bench_scale.py``: each phase's peak resident memory predicted from the shapes.

Every prediction is ``baseline + max over the phase's stages of the sum of its terms`` (bytes), where the baseline
is the measured peak RSS of a process that imports torch, transformers, the model classes and lowbit's drivers (and
nothing else), and each term is a count of
tensor elements times their bytes, read off the code that runs the phase (the comments name it). Terms are
upper-bound-ish estimates of what is alive at the stage's worst moment; allocator slack, Python objects and the
page cache are not modelled. Sizes: ``L`` layers, hidden ``h``, intermediate ``m``, vocabulary ``V``, ``P`` decoder
weights per layer (the seven linears), ``n × s`` calibration tokens, ``B × T`` training tokens.

- packed codes: ``bits/8`` bytes per weight; scales + zeros: one fp16 pair (4 bytes) per group of ``g`` inputs
  per output row (:class:`lowbit.quant.QuantLinear`).
- float model: the seven linears per layer plus embeddings, ``lm_head`` and norms in the load dtype (the
  quantizer's ``--dtype``, float32 by default). ``lowbit quantize`` without streaming loads the whole model; with
  streaming (``--stream``, when that flag exists) one decoder layer at a time.
- checkpoint pages: transformers reads safetensors shards through ``mmap``; the pages it has touched count in RSS
  until the file is closed, so loading a whole model costs the checkpoint's bytes once more while it runs.
- layer inputs/outputs: ``n · s · h`` values each, in the calibration store's dtype (float32 unless
  ``--calib-store`` says otherwise); the last sequential group (``down_proj``) also keeps, per call, the layer's
  output and ``down``'s input and output (``n · s · (m + 2h)`` float32, :func:`lowbit.quant.calibrate.
  collect_hessians_and_outputs`).
- H matrices: ``in² · 4`` bytes per linear of the largest sequential group (``q, k, v``: ``3h²``; ``down``: ``m²``).
- quantizer / initialiser workspace: the transient copies of the largest linear's ``W`` (``out · in``) and ``H``
  (``in²``) that the algorithm makes (:data:`WORKSPACE`).
- training: adapter parameters, their gradients and AdamW's two moments (``4 ×`` params × 4 bytes); under
  gradient checkpointing each layer keeps its input (``B · T · h`` float32) and one layer at a time is recomputed
  with its activations and their gradients; logits, their float32 log-softmax and gradient (``3 · B · T · V · 4``);
  a dequantised weight (the largest, float32) in the forward and the backward of :class:`QuantLinear`.
"""

from __future__ import annotations

import math

import _common  # noqa: F401  (puts this checkout first on sys.path, before an installed lowbit)

from lowbit.models.random_llama import LlamaShape
from lowbit.quant.model import CALL_TOKENS, SHORTCUT_MAX_BYTES

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The algorithm's worst moments for one linear: bytes per element of (in², out · in) alive at once beyond the
# group's H and the layer's own weights, read off the code; the workspace is the largest over moments and linears.
WORKSPACE = {
    # gptq_quantize: (1) H's clone, the identity and H + λI, the Cholesky factor and H^-1 (float32), W's float copy
    # and its clone; (2) output_error: H in float64, W and Q (float32), W, D = W - Q and D @ H (float64).
    "gptq": [(5 * 4, 2 * 4), (8, 2 * 4 + 3 * 8)],
    # magr first: H's float32 copy, its float64 copy and eigvalsh's workspace, H / λmax; W0, What, the step's V and
    # its padded copy. Then GPTQ on MagR's output (one more out · in).
    "magr-gptq": [(4 + 8 + 8 + 4, 5 * 4), (5 * 4, 3 * 4), (8, 3 * 4 + 3 * 8)],
    # rtn_quantize: W's float copy, the rounded codes and the dequantised weight for the reported error.
    "rtn": [(0, 3 * 4)],
    # cloq_init: (1) gram_root: damped H, its float64 eigendecomposition, R and R^+; (2) E, R E^T, U and V^T of its
    # SVD (float64, ≤ out · in each) beside R and R^+.
    "cloq": [(5 * 8, 0), (2 * 8, 4 * 8)],
    # diablo_calibrated_init: damped H and H in float64; W, Q and E in float64, H E^T and its padded copy.
    "calibrated": [(2 * 8, 5 * 8)],
}
# One layer's recomputation under checkpointing, per token: hidden-sized tensors (norm outputs, q, k, v, attention
# output, o, residual sums) and intermediate-sized ones (gate, up, silu(gate), product), each with its gradient.
TRAIN_H_PER_TOKEN, TRAIN_M_PER_TOKEN = 2 * 10, 2 * 4
CALIB_BATCH = 8  # samples per layer call in the calibration pass, at most CALL_TOKENS tokens (lowbit.quant.model)


def _linears(s: LlamaShape) -> dict[str, tuple[int, int]]:
    return {k.split(".")[-1]: v for k, v in s.linear_shapes().items()}


def layer_weights(s: LlamaShape) -> int:
    """``P``: weights of one decoder layer's seven linears."""
    return sum(o * i for o, i in s.linear_shapes().values())


def packed_layer_bytes(s: LlamaShape, bits: int, group: int) -> float:
    """One layer's packed codes plus fp16 scale and zero per group and output row."""
    return sum(o * i * bits / 8 + o * math.ceil(i / (i if group == -1 else group)) * 4
               for o, i in s.linear_shapes().values())


def other_params(s: LlamaShape) -> int:
    """Embeddings, ``lm_head`` and every norm gain."""
    return 2 * s.vocab * s.hidden + (2 * s.layers + 1) * s.hidden


def _largest_group_h(s: LlamaShape) -> int:
    h, m = s.hidden, s.intermediate
    return 4 * max(3 * h * h, h * h, 2 * h * h, m * m)


def _workspace(s: LlamaShape, algo: str) -> int:
    return max(int(per_h * i * i + per_w * o * i) for o, i in s.linear_shapes().values()
               for per_h, per_w in WORKSPACE[algo])


def _calib_terms(s: LlamaShape, n: int, seq: int, store_bytes: int) -> dict[str, float]:
    h, m = s.hidden, s.intermediate
    kept = n * seq * (m + 2 * h) * 4
    return {"layer inputs + outputs": 2 * n * seq * h * store_bytes,
            # the residual shortcut, off above lowbit.quant.model.SHORTCUT_MAX_BYTES (the layer runs again)
            "down_proj group: kept layer outputs, down inputs/outputs": kept if kept <= SHORTCUT_MAX_BYTES else 0,
            "forward of one batch of samples": min(n, max(1, min(CALIB_BATCH, CALL_TOKENS // seq))) * seq
            * (4 * m + 6 * h) * 4}


def _result(stages: dict[str, dict[str, float]], baseline: float) -> dict:
    totals = {k: sum(v.values()) for k, v in stages.items()}
    worst = max(totals, key=totals.get)
    return {"total_bytes": baseline + totals[worst], "baseline_bytes": baseline, "peak_stage": worst,
            "terms": {k: round(v) for k, v in stages[worst].items()},
            "stage_bytes": {k: round(v) for k, v in totals.items()}}


def predict_generate(s: LlamaShape, baseline: float, dtype_bytes: int = 2) -> dict:
    """:func:`~lowbit.models.random_llama.write_random_llama`: one tensor drawn in float32, its storage copy and the
    previous tensor."""
    big = max(s.vocab * s.hidden, max(o * i for o, i in s.linear_shapes().values()))
    terms = {"float32 draw": 4 * big, "stored copy + previous tensor": 2 * dtype_bytes * big}
    return _result({"largest tensor": terms}, baseline)


def predict_quantize(s: LlamaShape, baseline: float, *, method: str, bits: int, group: int, nsamples: int,
                     seqlen: int, stream: bool = False, load_bytes: int = 4, ckpt_bytes: int = 2,
                     store_bytes: int = 4) -> dict:
    """``lowbit quantize``: stages load (whole model, unless streamed), quantization of a layer, save."""
    L, P = s.layers, layer_weights(s)
    packed = L * packed_layer_bytes(s, bits, group)
    embeds = other_params(s) * load_bytes
    stages = {}
    if not stream:
        stages["load"] = {"float model": L * P * load_bytes + embeds,
                          "checkpoint pages mapped": (L * P + other_params(s)) * ckpt_bytes}
    work = {"embeddings + lm_head + norms": embeds,
            # without streaming the first layer is the worst: all float layers, nothing packed yet
            "float decoder layers": (1 if stream else L) * P * load_bytes,
            "packed codes + scales so far": packed if stream else 0,
            "H matrices (largest group)": _largest_group_h(s),
            f"{method} workspace (largest linear)": _workspace(s, method),
            **_calib_terms(s, nsamples, seqlen, store_bytes)}
    stages["quantize a layer"] = work
    # save_quantized: the state dict, and safetensors' serialised copy of it
    stages["save"] = {"packed model + float embeddings": packed + embeds, "serialised copy": packed + embeds}
    return _result(stages, baseline)


def predict_init(s: LlamaShape, baseline: float, *, init: str, bits: int, group: int, nsamples: int, seqlen: int,
                 adapter_params: int, load_bytes: int = 4, ckpt_bytes: int = 2, base_embed_bytes: int = 4,
                 stream: bool = True) -> dict:
    """A calibrated adapter init on a cached quantized base (``lowbit.recipes.finetune.build_model``): the packed
    base is loaded, then the float model (streamed: embeddings and head now, one decoder layer at a time; else
    whole), whose calibration pass takes the cached packed layers (shared with it) and initialises the adapters."""
    L, P = s.layers, layer_weights(s)
    packed = L * packed_layer_bytes(s, bits, group)
    qbase = packed + other_params(s) * base_embed_bytes
    fmodel = ((1 if stream else L) * P + other_params(s)) * load_bytes
    stages = {"initialise a layer": {"packed base": qbase, "float model" + (" (one layer)" if stream else ""): fmodel,
                                     "H matrices (largest group)": _largest_group_h(s),
                                     f"{init} workspace (largest linear)": _workspace(s, init),
                                     "adapter parameters": 4 * adapter_params,
                                     **_calib_terms(s, nsamples, seqlen, 4)}}
    if not stream:
        stages["load"] = {"packed base": qbase, "float model": fmodel,
                          "checkpoint pages mapped": (L * P + other_params(s)) * ckpt_bytes}
    return _result(stages, baseline)


def adapter_params(s: LlamaShape, adapter: str, targets: list[str], rank: int = 64, num_blocks: int = 64) -> int:
    """Trainable parameters: LoRA ``r (in + out)``, DiaBlo ``N · ceil(in/N) · ceil(out/N)`` per target."""
    lin = _linears(s)
    per = 0
    for t in targets:
        o, i = lin[t]
        per += rank * (i + o) if adapter == "lora" else num_blocks * math.ceil(i / num_blocks) * math.ceil(
            o / num_blocks)
    return s.layers * per


def predict_train(s: LlamaShape, baseline: float, *, adapter: str, targets: list[str], batch: int, seqlen: int,
                  bits: int, group: int, rank: int = 64, num_blocks: int = 64, embed_bytes: int = 4) -> dict:
    """One AdamW step with gradient checkpointing on the packed base (``load_quantized`` + ``apply_adapters``)."""
    h, m, tok = s.hidden, s.intermediate, batch * seqlen
    n_ad = adapter_params(s, adapter, targets, rank, num_blocks)
    big = max(o * i for o, i in s.linear_shapes().values())
    terms = {"packed codes + scales": s.layers * packed_layer_bytes(s, bits, group),
             "embeddings + lm_head + norms": other_params(s) * embed_bytes,
             "adapter params + grads + AdamW moments": 4 * n_ad * 4,
             "checkpointed layer inputs": (s.layers + 1) * tok * h * 4,
             "one layer recomputed (activations + grads)": tok * (TRAIN_H_PER_TOKEN * h + TRAIN_M_PER_TOKEN * m) * 4,
             "dequantised weight (forward + backward)": 2 * big * 4,
             "logits, log-softmax, grad": 3 * tok * s.vocab * 4}
    return {**_result({"step": terms}, baseline), "adapter_params": n_ad}
