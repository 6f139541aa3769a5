"""llm_svc: streams generations from LLM providers and the built-in local model."""
