"""The architecture numbers a plan needs, and the parameter count derived from them.

Parameter counting is exact for the decoder-only families we catalogue (Llama, Mistral,
Mixtral, Qwen2, Gemma-2, DeepSeek-V3): embeddings, attention (GQA or MLA), gated MLPs
(SwiGLU/GeGLU: gate, up and down matrices), MoE experts, routers and norms. Rotary
embeddings have no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, as its ``config.json`` describes it.

    MoE: ``num_experts`` routed experts of width ``moe_intermediate_size``, ``num_experts_per_tok``
    of them active per token, plus always-on shared experts of total width
    ``shared_expert_intermediate_size``; the first ``num_dense_layers`` layers keep a dense MLP of
    width ``intermediate_size`` (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step`` dense layers
    are counted there too, as if first). MLA (DeepSeek): ``kv_lora_rank > 0``; the KV cache then
    holds one latent of ``kv_lora_rank + qk_rope_head_dim`` values per token and layer, shared by all heads.
    Sliding windows: ``num_sliding_layers`` layers attend to the last ``sliding_window`` tokens only.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 0
    qkv_bias: bool = False
    gated_mlp: bool = True
    norms_per_layer: int = 2  # Gemma-2 has 4 (pre/post attention and MLP)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: a [1, hidden] gate on the shared expert
    num_dense_layers: int = 0
    sliding_window: int | None = None
    num_sliding_layers: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    source: str = "catalog"
    reference: str = ""  # the published parameter count we check against, with its source
    reference_params: tuple[float, float] | None = None  # published (total, active)
    native_weight_format: str | None = None  # GGUF: the dominant tensor type
    native_weights_bytes: int | None = None  # GGUF: exact bytes of all tensors in the file
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def num_full_layers(self) -> int:
        """Layers that attend to the whole context."""
        return self.num_layers - (self.num_sliding_layers if self.sliding_window else 0)

    @property
    def kv_heads_cached(self) -> int:
        """KV heads stored per layer (MLA stores one latent 'head')."""
        return 1 if self.uses_mla else self.num_kv_heads

    @property
    def kv_values_per_token_layer(self) -> int:
        """Values cached per token and layer: K and V of every KV head, or MLA's latent."""
        if self.uses_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def attn_qk_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.uses_mla else self.head_dim

    @property
    def attn_v_dim(self) -> int:
        return self.v_head_dim if self.uses_mla else self.head_dim

    def tokens_held(self, seq_len: int) -> tuple[int, int]:
        """(full-attention tokens, sliding-window tokens) one sequence keeps in its KV cache."""
        window = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        return seq_len, window


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by group. ``experts`` is every routed expert of every MoE layer."""

    embed: int
    lm_head: int
    attention: int
    dense_mlp: int
    experts: int
    shared_experts: int
    router: int
    norms: int
    bias: int
    active_experts: int

    @property
    def total(self) -> int:
        return (self.embed + self.lm_head + self.attention + self.dense_mlp + self.experts
                + self.shared_experts + self.router + self.norms + self.bias)

    @property
    def active(self) -> int:
        """Parameters one token touches: routed experts count only ``top_k / num_experts``."""
        return self.total - self.experts + self.active_experts

    @property
    def matrix(self) -> int:
        """Linear-layer matrices inside the blocks (what weight quantization applies to)."""
        return self.attention + self.dense_mlp + self.experts + self.shared_experts

    @property
    def other(self) -> int:
        return self.router + self.norms + self.bias

    @property
    def embedding_like(self) -> int:
        return self.embed + self.lm_head

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding_like


def attention_params_per_layer(m: ModelSpec) -> int:
    """Weight matrices of one attention block (no biases, no norms)."""
    h = m.hidden_size
    if m.uses_mla:
        qk = m.num_heads * m.attn_qk_dim
        q = h * m.q_lora_rank + m.q_lora_rank * qk if m.q_lora_rank else h * qk
        kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv_b = m.kv_lora_rank * m.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv_a + kv_b + m.num_heads * m.v_head_dim * h
    q_out = m.num_heads * m.head_dim
    kv_out = m.num_kv_heads * m.head_dim
    return h * (q_out + 2 * kv_out) + q_out * h


def mlp_params(m: ModelSpec, width: int) -> int:
    """One MLP of the given intermediate width (3 matrices if gated, else 2)."""
    return (3 if m.gated_mlp else 2) * m.hidden_size * width


def count_params(m: ModelSpec) -> ParamCounts:
    h, n_layers = m.hidden_size, m.num_layers
    per_layer_norms = m.norms_per_layer * h + ((m.q_lora_rank + m.kv_lora_rank) if m.uses_mla else 0)
    bias = n_layers * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim if m.qkv_bias else 0
    dense_layers = m.num_dense_layers if m.is_moe else n_layers
    expert = mlp_params(m, m.moe_intermediate_size) if m.is_moe else 0
    return ParamCounts(
        embed=m.vocab_size * h,
        lm_head=0 if m.tie_word_embeddings else m.vocab_size * h,
        attention=n_layers * attention_params_per_layer(m),
        dense_mlp=dense_layers * mlp_params(m, m.intermediate_size),
        experts=m.num_moe_layers * m.num_experts * expert,
        shared_experts=m.num_moe_layers * mlp_params(m, m.shared_expert_intermediate_size),
        router=m.num_moe_layers * (m.num_experts + m.shared_expert_gate) * h,
        norms=n_layers * per_layer_norms + h,
        bias=bias,
        active_experts=m.num_moe_layers * m.num_experts_per_tok * expert,
    )


def layer_params(m: ModelSpec, layer: int) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of block ``layer`` (biases and norms included)."""
    h = m.hidden_size
    non_expert = attention_params_per_layer(m) + m.norms_per_layer * h
    if m.uses_mla:
        non_expert += m.q_lora_rank + m.kv_lora_rank
    if m.qkv_bias:
        non_expert += (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    if not m.is_moe or layer < m.num_dense_layers:
        return non_expert + mlp_params(m, m.intermediate_size), 0
    non_expert += mlp_params(m, m.shared_expert_intermediate_size) + (m.num_experts + m.shared_expert_gate) * h
    return non_expert, m.num_experts * mlp_params(m, m.moe_intermediate_size)
