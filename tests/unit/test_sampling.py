"""What a streamed session refuses in its sampling parameters, checked before any engine starts."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from stream2llm.engine.sampling import check_sampling
from stream2llm.errors import StreamError


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY])
def test_output_kinds_other_than_cumulative_are_refused(kind):
    """The session counts the throw-away tokens off a cumulative output; DELTA would drop real
    tokens and FINAL_ONLY is refused by vLLM's streaming input."""
    with pytest.raises(StreamError, match=f"output_kind=CUMULATIVE \\(got {kind.name}\\)"):
        check_sampling(SamplingParams(max_tokens=4, output_kind=kind))


def test_cumulative_output_is_accepted():
    check_sampling(SamplingParams(max_tokens=4, output_kind=RequestOutputKind.CUMULATIVE))
