"""Log-probabilities in the two OpenAI shapes: chat (``content`` entries with ``top_logprobs``)
and completions (parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``)."""

from __future__ import annotations

from fleetlm.core.sched_output import PositionLogprobs


def _ranked(pos: PositionLogprobs, token: int, k: int):
    sampled = pos[token]
    top = sorted((lp.rank, t, lp) for t, lp in pos.items() if lp.rank <= k)
    return sampled, [(t, lp) for _, t, lp in top[:k]]


def chat_logprobs(token_ids: list[int], lps: list[PositionLogprobs] | None, k: int) -> dict | None:
    if lps is None:
        return None
    content = []
    for tok, pos in zip(token_ids, lps):
        sampled, top = _ranked(pos, tok, k)
        text = sampled.decoded_token or ""
        content.append({
            "token": text, "logprob": sampled.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                              "bytes": list((lp.decoded_token or "").encode())} for _, lp in top],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], lps: list[PositionLogprobs | None], k: int,
                        text_offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, pos in zip(token_ids, lps):
        if pos is None:  # first prompt token: nothing predicts it
            out["tokens"].append(None)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(text_offset)
            continue
        sampled, top = _ranked(pos, tok, k)
        text = sampled.decoded_token or ""
        out["tokens"].append(text)
        out["token_logprobs"].append(sampled.logprob)
        out["top_logprobs"].append({lp.decoded_token or "": lp.logprob for _, lp in top})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out
