"""The command-line flags of a deployment's instance, built one way for both layouts: the replicas
(``stream2llm serve``, typer) and the disaggregated decode instance (vLLM's OpenAI server).

Both command lines read a boolean as ``--name`` / ``--no-name`` (typer's flag pair, vLLM's
``BooleanOptionalAction``), so False is said explicitly: leaving it out would give the instance its
own default, which is not always False (vLLM's ``disable_hybrid_kv_cache_manager`` defaults to
auto, while the prefill instance was given False).
"""

from __future__ import annotations

from collections.abc import Mapping


def instance_flags(options: Mapping[str, object]) -> tuple[str, ...]:
    """``--name value`` per option, underscores as dashes; True: ``--name``, False: ``--no-name``,
    None: left out (the instance's default)."""
    out: list[str] = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        if value is True:
            out.append(f"--{flag}")
        elif value is False:
            out.append(f"--no-{flag}")
        elif value is not None:
            out += [f"--{flag}", str(value)]
    return tuple(out)
