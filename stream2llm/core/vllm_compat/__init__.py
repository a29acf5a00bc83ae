"""Every use of a vLLM private member or internal structure lives in this package (pinned: vLLM 0.32).

The rest of stream2llm talks to vLLM through its public surface (AsyncLLM, SamplingParams,
StreamingInput, ``scheduler_cls``, ``additional_config``) and through the small named functions and
hooks here. For the engine core: ``hooks`` (``HookedScheduler``: vLLM's private scheduler hooks
under stable names), ``scheduler_state`` (scheduler, request and step state with no public accessor
such as ``requests``, ``running``, ``num_computed_tokens``, ``SchedulerOutput.num_scheduled_tokens``),
``queues`` (ordering vLLM's queues, deferring a prefill, evicting a waiting request's KV),
``supersede`` (a queued chunk taking over the one in work, in place), ``kv_cut`` (the KV cut of an
update), ``kv_transfer`` (what the KV connector reads), ``in_flight`` for async scheduling (vLLM's
``AsyncScheduler``, what a step in flight holds); for the workers ``seeded_streams`` (a streaming
session's chunks seeded as one request); for the front end ``engine_process`` (starting
AsyncLLM, its engine-core processes, shutting it down). Only a request's ``request_id`` and
``sampling_params`` (what it was submitted with) and a streaming chunk's ``sampling_params`` are
read directly elsewhere. ``tests/unit/test_vllm_compat_contract.py`` (and
``test_async_scheduling.py`` for ``in_flight``) checks each assumption made here, so a vLLM
upgrade that breaks one fails loudly in one place instead of corrupting KV somewhere else.
"""

from stream2llm.core.vllm_compat.engine_process import *  # noqa: F403
from stream2llm.core.vllm_compat.engine_process import __all__ as _engine_process_names
from stream2llm.core.vllm_compat.hooks import *  # noqa: F403
from stream2llm.core.vllm_compat.hooks import __all__ as _hooks_names
from stream2llm.core.vllm_compat.in_flight import *  # noqa: F403
from stream2llm.core.vllm_compat.in_flight import __all__ as _in_flight_names
from stream2llm.core.vllm_compat.kv_cut import *  # noqa: F403
from stream2llm.core.vllm_compat.kv_cut import __all__ as _kv_cut_names
from stream2llm.core.vllm_compat.kv_transfer import *  # noqa: F403
from stream2llm.core.vllm_compat.kv_transfer import __all__ as _kv_transfer_names
from stream2llm.core.vllm_compat.queues import *  # noqa: F403
from stream2llm.core.vllm_compat.queues import __all__ as _queues_names
from stream2llm.core.vllm_compat.scheduler_state import *  # noqa: F403
from stream2llm.core.vllm_compat.scheduler_state import __all__ as _scheduler_state_names
from stream2llm.core.vllm_compat.seeded_streams import *  # noqa: F403
from stream2llm.core.vllm_compat.seeded_streams import __all__ as _seeded_streams_names
from stream2llm.core.vllm_compat.supersede import *  # noqa: F403
from stream2llm.core.vllm_compat.supersede import __all__ as _supersede_names

VLLM_API = "0.32"

__all__ = [
    "VLLM_API",
    *_engine_process_names,
    *_hooks_names,
    *_in_flight_names,
    *_kv_cut_names,
    *_kv_transfer_names,
    *_queues_names,
    *_scheduler_state_names,
    *_seeded_streams_names,
    *_supersede_names,
]
