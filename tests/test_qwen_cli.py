"""Every command on a Qwen-VL preset and on a local Qwen-VL checkpoint."""

import json

from tokendrop.cli import main
from tokendrop.presets import build_preset, synthetic_image


def test_every_command_runs_on_a_qwen_preset_and_a_local_checkpoint(tmp_path):
    """sweep, profile (and --throughput), show and train-router on the tiny Qwen2.5-VL preset,
    and show on a local checkpoint whose processor is built without a video processor."""
    name = "tiny-qwen2.5-vl"
    image = tmp_path / "image.png"
    synthetic_image(100, 60, seed=1).save(image)
    common = ["--no-progress"]
    assert main(["sweep", "--model", name, "--tasks", "shapes", "--methods", "cls", "oracle", "--budgets", "0.2",
                 "--limit", "3", "--out", str(tmp_path / "sweep"), *common]) == 0  # fmt: skip
    cells = json.loads((tmp_path / "sweep" / "summary.json").read_text())["cells"]
    assert {(c["method"], c["n"]) for c in cells} == {("none", 3), ("cls", 3), ("oracle", 3)}
    assert main(["profile", "--model", name, "--methods", "cls", "--budgets", "0.2", "--repeats", "1",
                 "--images", str(image), "--out", str(tmp_path / "profile"), *common]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "profile" / "profile.json").read_text())["cells"]
    (none,) = [r for r in rows if r["method"] == "none"]
    (cls,) = [r for r in rows if r["method"] == "cls"]
    tokens = json.loads((tmp_path / "profile" / "profile.json").read_text())["provenance"]["images"][0]["tokens"]
    assert none["llm_prompt_len"] - cls["llm_prompt_len"] == tokens - int(0.2 * tokens)
    assert main(["profile", "--model", name, "--methods", "cls", "--budgets", "0.2", "--repeats", "1", "--throughput",
                 "--max-batch-size", "2", "--memory-limit", "8GB", "--images", str(image),
                 "--out", str(tmp_path / "throughput"), *common]) == 0  # fmt: skip
    assert main(["train-router", "--model", name, "--data", "shapes", "--steps", "2", "--batch-size", "2",
                 "--samples", "2", "--validation-samples", "2", "--out", str(tmp_path / "router"), *common]) == 0  # fmt: skip
    assert (tmp_path / "router" / "router.safetensors").is_file()

    model, processor = build_preset(name)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.tokenizer.save_pretrained(checkpoint)
    processor.image_processor.save_pretrained(checkpoint)
    (checkpoint / "chat_template.jinja").write_text(processor.chat_template)
    assert main(["show", "--model", str(checkpoint), "--method", "hired", "--budget", "0.3",
                 "--out", str(tmp_path / "kept.png"), str(image)]) == 0  # fmt: skip
    assert (tmp_path / "kept.png").stat().st_size > 0
