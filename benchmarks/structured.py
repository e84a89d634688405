"""Structured output costs, one run, fixed workload (SmolLM2-135M-Instruct, this machine's default
dtype, greedy):

- TPOT at batch 16, unconstrained vs a regex and a JSON schema that cannot end within max_tokens
  (so both run the same number of steps at the same batch size); scenarios interleaved, repeated;
- TTFT of one request with a cold grammar (compiled on arrival) vs the same grammar cached vs none;
- speculation + structured output at batch 1 (decode tok/s): each against its parts, on a
  copy-heavy JSON task (rewrite a JSON record given in the prompt).

    flock /tmp/fleetlm-bench.lock python benchmarks/structured.py --out benchmarks/structured.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import uuid

from fleetlm import LLM, SamplingParams

QUESTIONS = ["Describe your favourite city.", "Write about the sea.", "Explain how bread is made.",
             "Tell a story about a robot.", "What is photosynthesis?", "Describe a mountain walk.",
             "Summarize the history of paper.", "Why do cats purr?", "How do airplanes fly?",
             "Describe a busy market.", "What makes music pleasant?", "Explain rain.",
             "Describe a library.", "How do bees make honey?", "What is a volcano?", "Describe winter."]
REGEX = r"[A-Za-z ,.']{1000}"
LONG_JSON = {"type": "array", "minItems": 300, "items": {"type": "string", "maxLength": 40}}
RECORD = {"id": 4711, "name": "Ada Lovelace", "city": "London", "tags": ["math", "engines", "poetry"],
          "born": 1815, "notes": "first published algorithm for a computing machine"}
RECORD_SCHEMA = {"type": "object", "properties": {k: ({"type": "integer"} if isinstance(v, int) else
                                                     {"type": "array", "items": {"type": "string"}} if isinstance(v, list)
                                                     else {"type": "string"}) for k, v in RECORD.items()},
                 "required": list(RECORD)}


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def tpot_ms(outs) -> float:
    vals = [(o.metrics.last_token_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
            for o in outs if len(o.outputs[0].token_ids) > 1]
    return 1e3 * statistics.mean(vals)


def batch16(llm: LLM, max_tokens: int, repeats: int) -> dict:
    cases = {"unconstrained": {"ignore_eos": True}, "regex": {"structured_outputs": {"regex": REGEX}},
             "json_schema": {"structured_outputs": {"json": LONG_JSON}}}
    for spec in cases.values():  # compile once so the batch measures decoding only
        llm.chat(chats(1), SamplingParams(max_tokens=2, temperature=0, **spec), use_tqdm=False)
    res: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, spec in cases.items():
            outs = llm.chat(chats(16), SamplingParams(max_tokens=max_tokens, temperature=0, **spec), use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs), name
            res[name].append(tpot_ms(outs))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"tpot_ms_runs": res, "tpot_ms_median": med,
            "overhead": {k: med[k] / med["unconstrained"] - 1 for k in cases if k != "unconstrained"}}


def ttft(llm: LLM, repeats: int) -> dict:
    def one(spec) -> float:
        (o,) = llm.chat(chats(1), SamplingParams(max_tokens=1, temperature=0, **spec), use_tqdm=False)
        return 1e3 * o.metrics.time_to_first_token

    rows: dict[str, list[float]] = {"none": [], "cold": [], "cached": []}
    for _ in range(repeats):
        schema = {"type": "object", "properties": {f"field_{uuid.uuid4().hex[:8]}": {"type": "string"},
                                                   "n": {"type": "integer"}}, "required": ["n"]}
        rows["none"].append(one({}))
        rows["cold"].append(one({"structured_outputs": {"json": schema}}))
        rows["cached"].append(one({"structured_outputs": {"json": schema}}))
    return {"ttft_ms_runs": rows, "ttft_ms_median": {k: statistics.median(v) for k, v in rows.items()}}


def spec_combo(model: str, max_tokens: int, repeats: int) -> dict:
    prompt = [[{"role": "user", "content": "Rewrite this record as JSON exactly, with the same fields and values: "
                + json.dumps(RECORD)}]]
    out = {}
    for spec_name, spec_cfg in (("off", None), ("ngram", {"method": "ngram", "num_speculative_tokens": 4,
                                                          "prompt_lookup_min": 2, "prompt_lookup_max": 5})):
        llm = LLM(model, speculative_config=spec_cfg) if spec_cfg else LLM(model)
        cases = (("free", {}), ("json", {"structured_outputs": {"json": RECORD_SCHEMA}}))
        runs: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _name, so in cases:  # warm: grammar compiled, kernels loaded
            llm.chat(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **so), use_tqdm=False)
        for _ in range(repeats):
            for name, so in cases:
                (o,) = llm.chat(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **so), use_tqdm=False)
                n = len(o.outputs[0].token_ids)
                runs[name].append((n - 1) / (o.metrics.last_token_time - o.metrics.first_token_time))
                text = o.outputs[0].text
        for name, _ in cases:
            out[f"{spec_name}+{name}"] = {"tokens": n, "decode_tok_s": statistics.median(runs[name]),
                                          "runs": runs[name], "text": text[:200]}
        llm.shutdown()
    base = out["off+free"]["decode_tok_s"]
    for v in out.values():
        v["speedup_vs_off_free"] = v["decode_tok_s"] / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    llm = LLM(a.model)
    result = {"model": a.model, "max_tokens": a.max_tokens, "load_before": load,
              "batch16": batch16(llm, a.max_tokens, a.repeats), "ttft": ttft(llm, a.repeats)}
    llm.shutdown()
    result["spec_plus_structured"] = spec_combo(a.model, 128, a.repeats)
    result["load_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
