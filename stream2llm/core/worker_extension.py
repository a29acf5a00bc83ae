"""vLLM's worker-side plugin point (``worker_extension_cls``), for what only workers need.

vLLM imports this module in each worker process, after the worker class and its model runner;
importing it has the runner seed each chunk of a streaming session afresh
(``vllm_compat.seeded_streams``), so a seeded session samples as one seeded request does. The
general plugin would do it in every process and import the model runner (~0.3 s) where none runs.
"""

from stream2llm.core.vllm_compat.seeded_streams import reseed_streaming_updates

reseed_streaming_updates()


class StreamWorkerExtension:
    """Adds nothing to the worker: the import above is the extension."""
