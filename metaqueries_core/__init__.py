"""MetaQueries core library: frozen MLLM adapters, queries, connector, decoder adapters, sampling, checkpoints.

No ComfyUI import anywhere in this package."""
