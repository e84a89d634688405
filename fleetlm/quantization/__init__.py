"""Quantization formats: a registry of ``QuantConfig`` s by name (docs/QUANTIZATION.md).

``LLM(model, quantization="int8")``, ``--quantization int4``. Names:

- ``int8``: weight-only int8, per output channel, symmetric (W8A16), quantized at load;
- ``int4`` (= ``int4_g32``), ``int4_g32``, ``int4_g64``, ``int4_g128``: weight-only int4, groups of
  32/64/128 input weights, asymmetric, quantized at load;
- ``w8a8``: int8 weights and dynamic per-token int8 activations (int8 matrix units where the CPU
  has them);
- ``dequantize``: a quantized GGUF is dequantized to the model dtype at load (what happened
  before quantized tensors were kept; a no-op for unquantized checkpoints);
- without a name, a GGUF file's Q4_0 / Q4_1 / Q4_K / Q6_K / Q8_0 tensors (``gguf.py``) and MXFP4
  experts (``mxfp4.py``) stay quantized when the model dtype is bf16 (fp32, the reference
  precision, dequantizes);
- ``gguf``: a GGUF file's tensors stay quantized whatever the dtype (fp32 included); an error for
  any other checkpoint;
- without a name, a Hugging Face directory whose config.json has a GPTQ or AWQ (GEMM)
  ``quantization_config`` loads its int4 codes, scales and zeros into the int4 method as shipped
  (``gptq.py``); ``gptq`` / ``awq`` ask for that explicitly (an error for any other checkpoint), and
  ``dequantize`` loads such a checkpoint in full precision. Any other name on a pre-quantized
  checkpoint is an error.
"""

from __future__ import annotations

from fleetlm.quantization.base import QuantConfig

INT4_DEFAULT_GROUP = 32  # SmolLM2 perplexity: g32 +0.25% over bf16, g64 +43% (docs/QUANTIZATION.md)
_NAMES = ("int8", "int4", "int4_g32", "int4_g64", "int4_g128", "w8a8", "dequantize", "gguf", "gptq", "awq")


def quantization_names() -> tuple[str, ...]:
    return _NAMES


def check_quantization(name: str | None) -> None:
    if name is not None and name not in _NAMES:
        raise ValueError(f"quantization {name!r} is not known; accepted: {', '.join(_NAMES)} (or None)")


def get_quant_config(name: str) -> QuantConfig | None:
    """The config for a user-facing name; ValueError naming the accepted values otherwise."""
    check_quantization(name)
    if name in ("dequantize", "gguf", "gptq", "awq"):  # decided by the GGUF / HF loader from the checkpoint
        return None
    from fleetlm.quantization.weight_only import Int4Config, Int8Config

    if name == "int8":
        return Int8Config()
    if name == "w8a8":
        from fleetlm.quantization.w8a8 import W8A8Config

        return W8A8Config()
    group = INT4_DEFAULT_GROUP if name == "int4" else int(name.split("_g")[1])
    return Int4Config(group)


__all__ = ["QuantConfig", "check_quantization", "get_quant_config", "quantization_names"]
