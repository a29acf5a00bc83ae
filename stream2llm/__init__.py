"""stream2llm: streaming-aware RAG serving on vLLM."""
