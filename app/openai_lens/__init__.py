"""The OpenAI-compatible lens: `/v1/models`, `/v1/completions`, `/v1/chat/completions` and vLLM's
runtime adapter and tokenizer routes, so the openai SDK, eval harnesses and the diffing toolkit's
clients reach every lens by model id."""
