"""Streaming deltas of the output processor: they concatenate to the non-stream result, stop
strings never leak, and per-request timings reach the metrics sink."""

from __future__ import annotations

import pytest

from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.engine.output_processor import OutputProcessor
from fleetlm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(model_path):
    import gguf

    from fleetlm.models.loader import gguf_fields
    from fleetlm.models.tokenizer import tokenizer_from_gguf_fields

    return tokenizer_from_gguf_fields(gguf_fields(gguf.GGUFReader(str(model_path))))


class Sink:
    def __init__(self):
        self.ttft, self.gaps, self.tokens, self.finished = [], [], 0, []

    def on_first_token(self, ttft):
        self.ttft.append(ttft)

    def on_inter_token(self, gap):
        self.gaps.append(gap)

    def on_new_tokens(self, n):
        self.tokens += n

    def on_finished(self, out):
        self.finished.append(out)


def _run(tok, text: str, params: SamplingParams, stream: bool, sink=None, chunk: int = 1):
    """Feed ``text``'s tokens one step at a time (then EOS) through a processor."""
    op = OutputProcessor(tok, sink)
    op.add("r", None, [1, 2, 3], params, ["r"], 0.0, stream=stream)
    ids = tok.encode(text) + [tok.eos_token_ids[0]]
    outs = []
    for i in range(0, len(ids), chunk):
        new = ids[i : i + chunk]
        last = i + chunk >= len(ids)
        ready, to_abort = op.process([EngineCoreOutput("r", new, "stop" if last else None)])
        outs += ready
        if to_abort:
            break
    return outs, op


@pytest.mark.parametrize("text", ["Hello wörld, 日本語 🎉 and more text", "plain words only here"])
def test_deltas_concatenate_to_the_final_text(tok, text):
    (final,), _ = _run(tok, text, SamplingParams(), stream=False)
    deltas, op = _run(tok, text, SamplingParams(), stream=True)
    assert "".join(d.outputs[0].text for d in deltas if d.outputs) == final.outputs[0].text == text
    assert sum(len(d.outputs[0].token_ids) for d in deltas if d.outputs) == len(final.outputs[0].token_ids)
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "stop"
    assert all(not d.finished for d in deltas[:-1])
    assert not op.has_unfinished()


def test_text_that_a_stop_string_later_cuts_is_never_streamed(tok):
    text = "alpha beta gamma delta epsilon"
    params = SamplingParams(stop=["ma del"])
    (final,), _ = _run(tok, text, params, stream=False)
    deltas, _ = _run(tok, text, params, stream=True)
    streamed = "".join(d.outputs[0].text for d in deltas if d.outputs)
    assert final.outputs[0].text == streamed == "alpha beta gam"
    assert deltas[-1].outputs[0].finish_reason == "stop" and deltas[-1].outputs[0].stop_reason == "ma del"


def test_sink_gets_ttft_gaps_tokens_and_the_finished_request(tok):
    sink = Sink()
    outs, _ = _run(tok, "one two three four", SamplingParams(), stream=True, sink=sink, chunk=2)
    n = sum(len(o.outputs[0].token_ids) for o in outs if o.outputs)
    assert len(sink.ttft) == 1 and sink.ttft[0] >= 0
    assert len(sink.gaps) == -(-n // 2) - 1  # one gap per later step with tokens
    assert sink.tokens == n and len(sink.finished) == 1


def test_unrecorded_requests_stay_out_of_the_metrics(tok):
    sink = Sink()
    op = OutputProcessor(tok, sink)
    op.add("h", None, [1], SamplingParams(max_tokens=1), ["h"], 0.0, record=False)
    op.process([EngineCoreOutput("h", [5], "length")])
    assert sink.ttft == [] and sink.tokens == 0 and sink.finished == []
