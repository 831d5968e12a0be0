#!/bin/sh
# The image's entry point: `pagedllm serve` and its flags (`docker run IMAGE --max-num-seqs 32`). Triton's Helm
# chart and KServe start Triton containers with `tritonserver --model-repository=DIR [flags]` as the arguments:
# that runs too, under pagedllm serve's supervision (drain on SIGTERM, a crashed stub seen, the OpenAI API),
# with DIR served as it is and the other flags passed on to tritonserver.
set -e
if [ "${1:-}" = "tritonserver" ]; then
    exec pagedllm "$@"
fi
exec pagedllm serve "$@"
