"""MiniGPT-Pancreas backend: the MiniGPT-v2 model, the inference engine, the HTTP service and the CLI."""
