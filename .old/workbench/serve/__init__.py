"""Serving for real: a Llama/Mixtral runtime over a paged KV cache, continuous batching,
disaggregated prefill/decode with KV pages moved through `transport`, an OpenAI-compatible
HTTP server and the traffic benchmark (see docs/serving.md).

Heavy imports (torch, fastapi) happen in the submodules, not here.
"""
