"""The testbed under vLLM: stock vLLM against the tokendrop plugin, for every method the
plugin serves at every budget: accuracy, agreement with the HF patch, requests/s.

    python -m tokendrop.eval.vllm_bench --n 200 --budgets 0.25 0.1 0.05 --out runs/vllm_testbed.json

Runs in a venv with vLLM (`make vllm`). Two engines (offline `LLM`, in-process, eager, fp32, a
small KV cache) on the trained testbed model saved to a local directory: stock vLLM, and the
plugin, whose server method is globalcom2 (the deepest-scoring method, so that its tower serves
every other) while each configuration's requests choose theirs (`mm_processor_kwargs`). All
requests of a configuration go to `generate` at once, so requests/s is the engine's offline
throughput (preprocessing, vision, prefill and 3 greedy decode steps) on this machine's CPU;
configurations are timed in turns and the median call counts, so that load from other
processes falls on each alike, on fresh images every round (caches off besides). The
HF-patched answers of each configuration are recorded beside, so the agreement of the two
engines is measured on the same samples.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from tokendrop.integrations.vllm import RECORD_ENV, architecture, save_for_vllm

from ..harness import chat_prompt
from .generation import generate_answers
from .shapes import MAX_NEW_TOKENS, score, shapes_samples


def engine(path, tokendrop: dict | None = None, max_num_seqs: int = 16, **settings):
    """An offline vLLM engine on `path`: stock, or with the tokendrop plugin's `tokendrop`
    options ({"method": ..., "budget": ...}) through hf_overrides (the plugin's model of the
    checkpoint's architecture)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: small, and records reachable
    from vllm import LLM

    (stock,) = json.loads((Path(path) / "config.json").read_text())["architectures"]
    overrides = None if tokendrop is None else {"architectures": [architecture(stock)], "tokendrop": tokendrop}
    options = (
        dict(
            model=str(path),
            enforce_eager=True,
            dtype="float32",
            max_model_len=512,
            kv_cache_memory_bytes=64 << 20,
            max_num_seqs=max_num_seqs,
            limit_mm_per_prompt={"image": 1},
            seed=0,
            hf_overrides=overrides,
        )
        | settings
    )
    return LLM(**options)


def requests(processor, samples, tokendrop: dict | None = None) -> list[dict]:
    """vLLM prompts of `samples`, each with the request options `tokendrop` where given."""
    options = {} if tokendrop is None else {"mm_processor_kwargs": {"tokendrop": tokendrop}}
    return [
        {"prompt": chat_prompt(processor, s["question"]), "multi_modal_data": {"image": s["image"]}} | options
        for s in samples
    ]


def answer(llm, processor, samples, cpu: list | None = None, tokendrop: dict | None = None):
    """(answers, vLLM's outputs, seconds) for `samples`, greedy, all submitted at once, with the
    request options `tokendrop` where given; the process's CPU seconds (all threads: the engine
    runs in-process) are appended to `cpu`."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, skip_special_tokens=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(requests(processor, samples, tokendrop), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return [o.outputs[0].text.strip() for o in outputs], outputs, seconds


def hf_answers(
    model, processor, samples, method: str | None, budget: float, options: dict, batch_size: int = 32
) -> tuple[list[str], list]:
    """The HF model's answers, patched with `method` (None: unpatched), and each image's record."""
    import tokendrop

    answers, records = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        if method is None:
            answers += generate_answers(
                model, processor, [[s["image"]] for s in batch], [s["question"] for s in batch], MAX_NEW_TOKENS
            )
            continue
        with tokendrop.patched(model, method, budget=budget, processor=processor, **options) as handle:
            answers += generate_answers(
                model, processor, [[s["image"]] for s in batch], [s["question"] for s in batch], MAX_NEW_TOKENS
            )
            records += handle.last
    return answers, records


def accuracy(answers, samples) -> float:
    return 100 * sum(score(a, s["answer"]) for a, s in zip(answers, samples)) / len(samples)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="shapes test samples")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.1, 0.05])
    parser.add_argument("--methods", nargs="+", help="methods served (default: every registered method)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per configuration, in turns")
    parser.add_argument("--model-dir", default="runs/vllm_testbed_model")
    parser.add_argument("--out", default="runs/vllm_testbed.json")
    args = parser.parse_args(argv)

    from tokendrop.harness import text_table
    from tokendrop.method import METHODS
    from tokendrop.preset_specs import with_preset_defaults
    from tokendrop.presets import build_preset

    torch.manual_seed(0)
    model, processor = build_preset("testbed")
    path = save_for_vllm(model, processor, args.model_dir)
    # a fresh set of images for every timed round: vLLM would otherwise serve repeats from its
    # caches (encoder outputs, processed inputs, prefixes); accuracy is on the first set
    rounds = list(shapes_samples("test", args.n * args.repeats))
    rounds = [rounds[r * args.n : (r + 1) * args.n] for r in range(args.repeats)]
    samples = rounds[0]
    methods = args.methods or METHODS.names()
    defaults = with_preset_defaults("testbed", methods, {})  # the router trained for the testbed
    configs = [("stock", None, 1.0)] + [(f"{m}@{b}", m, b) for m in methods for b in args.budgets]
    uncached = dict(enable_prefix_caching=False, mm_processor_cache_gb=0)
    engines = {
        "stock": engine(path, None, **uncached),
        "plugin": engine(path, {"method": "globalcom2", "budget": args.budgets[0]}, **uncached),
    }
    timings = {name: [] for name, _, _ in configs}
    cpu = {name: [] for name, _, _ in configs}
    outputs: dict[str, tuple] = {}
    warm_up = list(shapes_samples("validation", 4))
    for llm in engines.values():
        answer(llm, processor, warm_up)
    for r, batch in enumerate(rounds):
        for name, method, budget in configs:
            asked = None if method is None else {"method": method, "budget": budget, **defaults.get(method, {})}
            answers, outs, seconds = answer(
                engines["stock" if method is None else "plugin"], processor, batch, cpu[name], asked
            )
            timings[name].append(seconds)
            if r == 0:
                outputs[name] = (answers, outs)
    del engines, llm
    gc.collect()
    results = []
    for name, method, budget in configs:
        answers, outs = outputs[name]
        options = {"newlines": "all", **defaults.get(method, {})} if method else {}  # the plugin's default
        hf, _ = hf_answers(model, processor, samples, method, budget, options)
        results.append(
            dict(
                config=name,
                method=method,
                budget=budget,
                options=options,
                accuracy_vllm=accuracy(answers, samples),
                accuracy_hf=accuracy(hf, samples),
                agreement_with_hf=100 * sum(a == b for a, b in zip(answers, hf)) / len(samples),
                requests_per_s=len(samples) / statistics.median(timings[name]),
                seconds=timings[name],
                # CPU time is what other load on a shared machine disturbs least
                requests_per_cpu_s=len(samples) / statistics.median(cpu[name]),
                cpu_seconds=cpu[name],
                mean_prompt_tokens=sum(len(o.prompt_token_ids) for o in outs) / len(outs),
            )
        )
        print(json.dumps(results[-1]), flush=True)
    stock = results[0]["requests_per_s"]
    rows = [
        [r["config"], f"{r['accuracy_vllm']:.1f}", f"{r['accuracy_hf']:.1f}", f"{r['agreement_with_hf']:.1f}",
         f"{r['requests_per_s']:.2f}", f"{r['requests_per_s'] / stock:.2f}", f"{r['mean_prompt_tokens']:.0f}"]
        for r in results
    ]  # fmt: skip
    headers = ["config", "vLLM acc %", "HF acc %", "agree %", "req/s", "x stock", "prompt tokens"]
    print(text_table(headers, rows, title=f"shapes test, {args.n} samples, vLLM plugin against HF patch"))
    import transformers
    import vllm

    report = dict(
        task="shapes",
        split="test",
        n=args.n,
        max_new_tokens=MAX_NEW_TOKENS,
        greedy=True,
        engine=dict(
            enforce_eager=True,
            dtype="float32",
            max_num_seqs=16,
            in_process=True,
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            server_method="globalcom2",
            per_request_options=True,
            timed_rounds=args.repeats,
            samples_per_round=args.n,
        ),
        versions=dict(
            vllm=vllm.__version__,
            torch=torch.__version__,
            transformers=transformers.__version__,
            python=platform.python_version(),
        ),
        machine=dict(cpu_count=os.cpu_count(), processor=platform.processor() or platform.machine()),
        git=_git_hash(),
        results=results,
        record_env=RECORD_ENV,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def _git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
