"""tokendrop inside other systems, each through the selection path `patch()` uses
(`tokendrop.pruning`): `vllm`, the vLLM plugin."""
