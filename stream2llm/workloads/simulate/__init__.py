"""A discrete-event simulator of the engine (same policies, fitted step costs), its cost model and
the calibration that fits it. Importing it loads no vLLM: it runs in seconds at GPU scale."""

from stream2llm.workloads.simulate.runs import simulate_runs
from stream2llm.workloads.simulate.simulator import TEMPLATE_TOKENS, SimResult, Simulator

__all__ = ["TEMPLATE_TOKENS", "SimResult", "Simulator", "simulate_runs"]
