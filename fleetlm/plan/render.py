"""Human-readable plan: sections of (quantity, value, how it was computed) rows.

Rendered with ``rich`` when it is installed, as aligned plain text otherwise.
"""

from __future__ import annotations

from fleetlm.plan.formats import kv_dtype_bytes
from fleetlm.plan.report import InferenceReport

Row = tuple[str, str, str]
Section = tuple[str, list[Row]]


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def fmt_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f}{unit}"
    return f"{n:,.0f}"


def fmt_time(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:,.1f} days"
    if s >= 1:
        return f"{s:,.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:,.2f} ms"
    return f"{s * 1e6:,.1f} µs"


def inference_sections(r: InferenceReport) -> list[Section]:
    m, c, w, mp, lay = r.model, r.counts, r.workload, r.plan.memory, r.plan.layout
    kvb = kv_dtype_bytes(w.kv_dtype)
    if m.uses_mla:
        kv_how = (f"{m.num_layers} layers × ({m.kv_lora_rank} latent + {m.qk_rope_head_dim} rope) "
                  f"× {kvb} B (MLA)")
    else:
        kv_how = f"2 (K,V) × {m.num_layers} layers × {m.num_kv_heads} KV heads × {m.head_dim} × {kvb} B"
    moe = (f"{m.num_experts} experts, top-{m.num_experts_per_tok}"
           + (f", {m.num_shared_experts} shared" if m.num_shared_experts else "")) if m.is_moe else "dense"
    swa = f", sliding window {m.sliding_window} on {m.num_sliding_layers} layers" if m.sliding_window else ""
    model_rows: list[Row] = [
        ("architecture", f"{m.num_layers} layers, d={m.hidden_size}, {m.num_heads} heads / "
         f"{m.num_kv_heads} KV heads", f"{moe}{swa}; tied embeddings: {m.tie_word_embeddings}"),
        ("parameters", fmt_count(c.total), f"embed {fmt_count(c.embedding_like)} + blocks "
         f"{fmt_count(c.non_embedding)}" + (f"; published: {m.reference}" if m.reference else "")),
        ("active per token", fmt_count(c.active), "routed experts count top_k/E" if m.is_moe else "all"),
    ]
    mem_rows: list[Row] = [
        ("weights", fmt_bytes(r.weights_bytes), f"{r.dtype}"),
        ("weights / GPU", fmt_bytes(mp.weights_bytes_per_gpu),
         f"heaviest of {lay.pp} stage(s), matrices ÷ TP={lay.tp}" + (f", experts ÷ EP={lay.ep}" if m.is_moe else "")),
        ("activations + runtime / GPU", fmt_bytes(mp.activation_bytes_per_gpu),
         f"estimate for a {w.max_batched_tokens}-token step + {fmt_bytes(r.hw.runtime_overhead_bytes)} runtime"),
        ("KV budget / GPU", fmt_bytes(mp.kv_budget_bytes_per_gpu),
         f"{w.memory_utilization:.0%} of {fmt_bytes(r.hw.memory_bytes)} − weights − activations"),
        ("KV / token", f"{r.kv_bytes_per_token:,} B ({fmt_bytes(r.kv_bytes_per_token)})", kv_how),
        ("KV / token / GPU", fmt_bytes(mp.kv_bytes_per_token_per_gpu), "heads ÷ TP, layers ÷ PP, tokens ÷ CP"),
        ("KV / sequence", fmt_bytes(r.kv_bytes_per_seq), f"{w.context} tokens" + (" (window-capped layers)" if m.sliding_window else "")),
        (f"KV for {w.concurrency} seqs", fmt_bytes(r.kv_bytes_total), "whole model, all GPUs"),
        ("KV blocks / GPU", f"{mp.kv_num_blocks_per_gpu:,}", f"⌊budget ÷ ({w.block_size} tokens × KV/token/GPU)⌋"),
        ("max concurrent seqs", f"{mp.max_concurrent_seqs:,}", f"{mp.max_seqs_per_replica:,} per replica × DP={lay.dp} at {w.context} tokens"),
    ]
    return [(f"Model: {m.name}", model_rows), (f"Memory on {r.gpus} × {r.hw.name}", mem_rows),
            ("Roofline", _roofline_rows(r)), ("Parallelism", _plan_rows(r))]


def _roofline_rows(r: InferenceReport) -> list[Row]:
    rf = r.roofline
    rows: list[Row] = [
        ("peak / bandwidth", f"{rf.peak_flops / 1e12:,.1f} TFLOP/s, {rf.mem_bandwidth / 1e9:,.0f} GB/s",
         f"{rf.compute_dtype} dense; ridge = {rf.ridge_intensity:,.0f} FLOP/byte"),
    ]
    for p in rf.points():
        label = f"{p.name} B={p.seqs}" if p.name == "decode" else f"prefill {p.tokens} tok"
        rows.append((label, fmt_time(p.time_s),
                     f"{p.intensity:,.1f} FLOP/B, {p.bound}-bound: max(compute {fmt_time(p.t_compute_s)}, "
                     f"memory {fmt_time(p.t_memory_s)}) + comm {fmt_time(p.t_comm_s)}"))
    cb = rf.critical_batch
    rows += [
        ("TTFT ≥", fmt_time(rf.ttft_s), f"prefill of {r.workload.prompt_len} tokens"),
        ("TPOT ≥", fmt_time(rf.tpot_s), f"decode step at B={rf.decode.seqs}, KV length {rf.decode.context}"),
        ("decode throughput ≤", f"{rf.decode_tokens_per_s:,.0f} tok/s", f"{rf.replicas} replica(s) × B ÷ TPOT"),
        ("prefill throughput ≤", f"{rf.prefill_tokens_per_s:,.0f} tok/s", f"{rf.replicas} replica(s)"),
        ("compute-bound from", f"B={cb}" if cb else "never",
         "decode batch where compute time reaches memory time" if cb else
         "KV reads grow with the batch as fast as FLOPs do"),
    ]
    return rows


def _plan_rows(r: InferenceReport) -> list[Row]:
    lay = r.plan.layout
    rows: list[Row] = [("layout", f"TP={lay.tp} PP={lay.pp} EP={lay.ep} CP={lay.cp} DP={lay.dp}",
                        f"{lay.replica_gpus} GPU(s) per replica")]
    rows += reason_rows(r.plan.reasons)
    rows += [("warning", warning, "") for warning in r.warnings]
    return rows


def reason_rows(reasons: tuple[str, ...] | list[str]) -> list[Row]:
    """``"TP=8: because ..."`` becomes the row ``("TP=8", "because ...", "")``."""
    rows: list[Row] = []
    for reason in reasons:
        head, _, why = reason.partition(": ")
        rows.append((head, why, "") if why else ("why", reason, ""))
    return rows


def render(sections: list[Section], title: str) -> str:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return render_plain(sections, title)
    console = Console(width=140, record=True)
    with console.capture() as cap:
        console.rule(title)
        for name, rows in sections:
            table = Table(title=name, title_justify="left", show_header=False, expand=True)
            table.add_column("quantity", style="bold", no_wrap=True)
            table.add_column("value", style="cyan")
            table.add_column("how", style="dim")
            for row in rows:
                table.add_row(*row)
            console.print(table)
    return cap.get()


def render_plain(sections: list[Section], title: str) -> str:
    out = [title, "=" * len(title)]
    for name, rows in sections:
        out += ["", name, "-" * len(name)]
        width = max((len(q) for q, _, _ in rows), default=0)
        for q, v, how in rows:
            out.append(f"{q:<{width}}  {v}" + (f"   [{how}]" if how else ""))
    return "\n".join(out) + "\n"
