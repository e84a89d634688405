"""Built-in architectures: the numbers of each model's official ``config.json``.

``reference_params`` is the independently published parameter count (total, active) that the
unit tests compare our count against; the source of each is in ``reference``.
"""

from __future__ import annotations

from fleetlm.plan.model_spec import ModelSpec

_LLAMA31 = dict(num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072)
_CARD = "Llama-3.1 model card / HF safetensors count"

CATALOG_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("llama-3.1-8b", hidden_size=4096, num_layers=32, num_heads=32,
              intermediate_size=14336, **_LLAMA31, reference_params=(8.03e9, 8.03e9),
              reference=f"8.03B ({_CARD})", aliases=("meta-llama/llama-3.1-8b", "llama3.1-8b")),
    ModelSpec("llama-3.1-70b", hidden_size=8192, num_layers=80, num_heads=64,
              intermediate_size=28672, **_LLAMA31, reference_params=(70.6e9, 70.6e9),
              reference=f"70.6B ({_CARD})", aliases=("meta-llama/llama-3.1-70b", "llama3.1-70b")),
    ModelSpec("llama-3.1-405b", hidden_size=16384, num_layers=126, num_heads=128,
              intermediate_size=53248, **_LLAMA31, reference_params=(405.9e9, 405.9e9),
              reference=f"405.9B ({_CARD})",
              aliases=("meta-llama/llama-3.1-405b", "llama3.1-405b")),
    # Mistral-7B-v0.1: sliding window of 4096 tokens on every layer.
    ModelSpec("mistral-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
              head_dim=128, intermediate_size=14336, vocab_size=32000,
              max_position_embeddings=32768, sliding_window=4096, num_sliding_layers=32,
              reference_params=(7.24e9, 7.24e9),
              reference="7.24B (HF safetensors count; Mistral's announcement says 7.3B)",
              aliases=("mistralai/mistral-7b-v0.1", "mistral-7b-v0.1")),
    ModelSpec("qwen2.5-72b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
              head_dim=128, intermediate_size=29568, vocab_size=152064, qkv_bias=True,
              max_position_embeddings=131072, reference_params=(72.7e9, 72.7e9),
              reference="72.7B total, 70.0B non-embedding (Qwen2.5-72B model card)",
              aliases=("qwen/qwen2.5-72b",)),
    ModelSpec("mixtral-8x7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
              head_dim=128, intermediate_size=14336, vocab_size=32000,
              max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=14336, reference_params=(46.7e9, 12.9e9),
              reference="46.7B total, 12.9B active (Mistral AI, 'Mixtral of experts', 2023)",
              aliases=("mistralai/mixtral-8x7b-v0.1",)),
    # DeepSeek-V3: MLA attention, 3 dense layers then 58 MoE layers of 256 routed experts
    # (8 active) plus 1 shared expert. The 14B multi-token-prediction module is not counted,
    # as in the report's 671B (the HF checkpoint's 685B includes it).
    ModelSpec("deepseek-v3", hidden_size=7168, num_layers=61, num_heads=128, num_kv_heads=128,
              head_dim=192, intermediate_size=18432, vocab_size=129280,
              max_position_embeddings=163840, num_experts=256, num_experts_per_tok=8,
              moe_intermediate_size=2048, num_shared_experts=1,
              shared_expert_intermediate_size=2048, num_dense_layers=3, q_lora_rank=1536,
              kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
              reference_params=(671e9, 37e9),
              reference="671B total, 37B activated (DeepSeek-V3 technical report, arXiv:2412.19437)",
              aliases=("deepseek-ai/deepseek-v3", "deepseek-r1")),
    # Gemma-2-9B: 4 norms per layer, tied embeddings, local (4096) / global layers alternate.
    ModelSpec("gemma-2-9b", hidden_size=3584, num_layers=42, num_heads=16, num_kv_heads=8,
              head_dim=256, intermediate_size=14336, vocab_size=256000,
              tie_word_embeddings=True, max_position_embeddings=8192, norms_per_layer=4,
              sliding_window=4096, num_sliding_layers=21,
              reference_params=(9_241_705_984, 9_241_705_984),
              reference="917,504,000 embedding + 8,324,201,984 non-embedding (Gemma 2 report, Table 2)",
              aliases=("google/gemma-2-9b",)),
    ModelSpec("smollm2-135m", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
              head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
              max_position_embeddings=8192, reference_params=(134_515_008, 134_515_008),
              reference="135M (HF model card); 134,515,008 in the GGUF tensor table",
              aliases=("huggingfacetb/smollm2-135m", "huggingfacetb/smollm2-135m-instruct")),
)

_BY_NAME: dict[str, ModelSpec] = {}
for _spec in CATALOG_MODELS:
    for _key in (_spec.name, *_spec.aliases):
        _BY_NAME[_key.lower()] = _spec


def catalog_names() -> list[str]:
    return [m.name for m in CATALOG_MODELS]


def catalog_model(name: str) -> ModelSpec | None:
    return _BY_NAME.get(name.lower())
