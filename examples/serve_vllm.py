"""Serve the trained testbed model with vLLM and the tokendrop plugin, offline, on a CPU.

    make vllm                                   # once: the serving venv, .venv-vllm
    .venv-vllm/bin/python examples/serve_vllm.py

The testbed (a tiny LLaVA-NeXT that answers "What colour is the triangle?" about small shapes)
is written where vLLM loads a checkpoint from, then one engine answers each question three
ways in one batch: unpruned (budget 1.0), with the server's method (the learned router at 10%
of each image's tokens), and with a request that asks for 5% (`mm_processor_kwargs`). Each
answer is printed beside the truth with the prompt's length, which shows the tokens dropped.
"""

import os
import tempfile

from vllm import LLM, SamplingParams

from tokendrop.eval.shapes import shapes_samples
from tokendrop.harness import chat_prompt
from tokendrop.integrations.vllm import ARCHITECTURE, save_for_vllm
from tokendrop.presets import build_preset

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: quicker to start on a CPU

model, processor = build_preset("testbed")
folder = save_for_vllm(model, processor, tempfile.mkdtemp(prefix="testbed-vllm-"))
llm = LLM(
    model=str(folder),
    hf_overrides={
        "architectures": [ARCHITECTURE],
        "tokendrop": {"method": "router", "budget": 0.1, "router": "testbed"},
    },
    enforce_eager=True,
    dtype="float32",
    max_model_len=512,
    kv_cache_memory_bytes=64 << 20,
    limit_mm_per_prompt={"image": 1},
)
samples = list(shapes_samples("test", 4))
asks = {"budget 1.0": {"budget": 1.0}, "router 10%": None, "router 5%": {"budget": 0.05}}
requests = [
    {"prompt": chat_prompt(processor, s["question"]), "multi_modal_data": {"image": s["image"]}}
    | ({} if ask is None else {"mm_processor_kwargs": {"tokendrop": ask}})
    for s in samples
    for ask in asks.values()
]
outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
for i, sample in enumerate(samples):
    print(f"{sample['question']} (truth: {sample['answer']})")
    for (name, _), output in zip(asks.items(), outputs[i * len(asks) : (i + 1) * len(asks)]):
        print(f"  {name:11s} {output.outputs[0].text.strip():8s} prompt of {len(output.prompt_token_ids)} tokens")
