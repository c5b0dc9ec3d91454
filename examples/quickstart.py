"""Patch a LLaVA-NeXT model in one line and see what reaches the LLM.

python examples/quickstart.py                                   # offline, the tiny preset
python examples/quickstart.py --model llava-hf/llava-v1.6-vicuna-7b-hf --image photo.jpg
"""

import argparse

import torch
from PIL import Image

import tokendrop
from tokendrop.loading import load_model, load_processor
from tokendrop.presets import synthetic_image

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny", help="a Hugging Face id, a local checkpoint or a preset")
parser.add_argument("--image", help="an image file (default: a synthetic 672x672 image)")
parser.add_argument("--question", default="What is in the image?")
args = parser.parse_args()

model, processor = load_model(args.model), load_processor(args.model)
image = Image.open(args.image).convert("RGB") if args.image else synthetic_image(672, 672)
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)

for budget in (1.0, 0.2):
    with tokendrop.patched(model, "hired", budget=budget) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    record = handle.last[0]
    print(
        f"budget {budget}: kept {record.n_kept}/{record.n_before} visual tokens "
        f"(+{record.n_newlines} newlines), per partition {record.partitions}"
    )
    print(f"  answer: {answer!r}")
