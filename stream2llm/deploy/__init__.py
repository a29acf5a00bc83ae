"""Deployments beyond one process: several ``stream2llm serve`` instances behind vllm-router."""
