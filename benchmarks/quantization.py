"""Quantization benchmark: GNP-IQ against round-to-nearest, HQQ, bitsandbytes NF4 and the limit of the format.

On the real weights of all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (every linear layer except output heads), for 2,
3, 4 and 8 bits at group size 64, side by side:

    rtn     min-max round-to-nearest on the GNP-IQ storage format (``minmax_quantize``).
    hqq     the ``hqq`` package's own optimizer (``Quantizer.quantize(optimize=True)``, axis 1, bit-packed); its
            scales and zeros are rounded to float16, as a float16 model stores them, before the error is measured.
    nf4     bitsandbytes ``quantize_4bit(quant_type="nf4", blocksize=64)``, 4 bits only, on CPU.
    gnpiq   ``gnpiq_quantize`` with the defaults of ``GNPIQConfig`` (layer ``i`` seeded ``i``, as ``quantize_model``).
    limit   ``clipping_search_quantize``, the brute-force limit of the storage format: only on a few layers
            (``LIMIT_LAYERS``), where every other method runs again for the ratios.

Measured: the relative Frobenius error of all linear weights together, ``sqrt(sum (W - W_hat)**2 / sum W**2)``; for
MiniLM the relative error of its final hidden states on the first 256 sentences of SST-2's dev set (padding masked
out); seconds to quantize (the method's call, packing included, evaluation excluded); bytes actually stored (codes,
scales, zeros; NF4's absmax and code table) and their fraction of the float16 bytes. On the few layers the timings
are repeated (``--repeats``, methods interleaved) and the median is reported, because the machine is shared.

Every finished (model, bits, method) result is written at once to ``benchmarks/results/quantization/`` and a rerun
resumes from those files (``--redo`` recomputes them); ``--report`` only rebuilds the tables of
``docs/quantization.md`` (between its ``results`` markers) and ``docs/quantization_error.png`` from them.
``--sweep`` measures each solver setting on the few MiniLM layers, one at a time around the defaults.

Usage:
    python benchmarks/quantization.py --threads 1          # everything missing, then the report
    python benchmarks/quantization.py --report             # tables and plot from the saved results only
    python benchmarks/quantization.py --sweep --threads 1  # the settings sweep behind the defaults
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "quantization"
DOC_PATH = REPO_ROOT / "docs" / "quantization.md"
FIGURE_PATH = REPO_ROOT / "docs" / "quantization_error.png"
SST2_DEV = REPO_ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"

MODELS = ("minilm", "smollm2")
BITS = (2, 3, 4, 8)
METHODS = ("rtn", "hqq", "nf4", "gnpiq")
GROUP_SIZE = 64
NUM_SENTENCES = 256

# The few layers of the limit rows: one attention and two feed-forward shapes of MiniLM, two of SmolLM2.
LIMIT_LAYERS = {
    "minilm": (
        "encoder.layer.0.attention.self.query",
        "encoder.layer.2.intermediate.dense",
        "encoder.layer.4.output.dense",
    ),
    "smollm2": ("model.layers.10.self_attn.o_proj", "model.layers.20.self_attn.k_proj"),
}

logger = logging.getLogger("benchmarks.quantization")


# ----------------------------------------------------------------------------------------------------------------
# Methods: each maps a float weight [out, in] to a stored form that knows its bytes and its dequantized weight.


@dataclass
class Stored:
    nbytes: int
    dequantize: Callable[[], torch.Tensor]


def _gnpiq_format(quantized, bits: int) -> Stored:
    from peft_ismoe.quantization import GNPIQLinear

    layer = GNPIQLinear.from_quantized(quantized, bits=bits)
    return Stored(layer.quantized_nbytes(), lambda: layer.dequantize(torch.float32))


def quantize_rtn(W: torch.Tensor, bits: int, index: int) -> Stored:
    from peft_ismoe.quantization import minmax_quantize

    return _gnpiq_format(minmax_quantize(W, bits=bits, group_size=GROUP_SIZE), bits)


def quantize_gnpiq(W: torch.Tensor, bits: int, index: int, **overrides) -> Stored:
    from peft_ismoe.quantization import GNPIQConfig, gnpiq_quantize

    kwargs = GNPIQConfig(bits=bits, group_size=GROUP_SIZE).solver_kwargs() | overrides
    return _gnpiq_format(gnpiq_quantize(W, seed=index, **kwargs), bits)


def quantize_limit(W: torch.Tensor, bits: int, index: int) -> Stored:
    from peft_ismoe.quantization.reference import clipping_search_quantize

    return _gnpiq_format(clipping_search_quantize(W, bits=bits, group_size=GROUP_SIZE), bits)


def quantize_hqq(W: torch.Tensor, bits: int, index: int) -> Stored:
    from hqq.core.quantize import Quantizer

    W_q, meta = Quantizer.quantize(
        W, nbits=bits, group_size=GROUP_SIZE, optimize=True, axis=1, bitpack=True,
        compute_dtype=torch.float32, device=str(W.device),
    )  # fmt: skip
    # A float16 model keeps HQQ's scale and zero in float16: measure the error of what would be stored.
    meta["scale"] = meta["scale"].half().float()
    meta["zero"] = meta["zero"].half().float()
    nbytes = W_q.numel() * W_q.element_size() + 2 * (meta["scale"].numel() + meta["zero"].numel())
    return Stored(nbytes, lambda: Quantizer.dequantize(W_q, meta).reshape(W.shape).float())


def quantize_nf4(W: torch.Tensor, bits: int, index: int) -> Stored:
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(W, blocksize=GROUP_SIZE, quant_type="nf4")
    tensors = (packed, state.absmax, state.code)  # codes, one float32 absmax per block, the 16-value table
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return Stored(nbytes, lambda: bnbF.dequantize_4bit(packed, state).reshape(W.shape).float())


QUANTIZERS = {
    "rtn": quantize_rtn,
    "hqq": quantize_hqq,
    "nf4": quantize_nf4,
    "gnpiq": quantize_gnpiq,
    "limit": quantize_limit,
}


def applies(method: str, bits: int) -> bool:
    return method != "nf4" or bits == 4


# ----------------------------------------------------------------------------------------------------------------
# Models and data.


def load_model(name: str):
    from peft_ismoe.backbones import minilm_path, smollm2_path

    if name == "minilm":
        from transformers import AutoModel

        return AutoModel.from_pretrained(minilm_path()).eval()
    from transformers import AutoModelForCausalLM

    folder, gguf_file = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file).eval()


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Float32 copies of every quantizable weight, ``[out, in]``, by layer name (output heads excluded)."""
    from peft_ismoe.quantization import DEFAULT_MODULES_TO_NOT_CONVERT, find_linear_layers

    layers = find_linear_layers(model, DEFAULT_MODULES_TO_NOT_CONVERT)
    return {name: module.weight.detach().float().clone() for name, module in layers.items()}


def sst2_sentences(path: Path = SST2_DEV, count: int = NUM_SENTENCES) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t")[0] != "sentence":
        raise ValueError(f"{path} should start with a 'sentence\\tlabel' header, got {lines[0]!r}.")
    return [line.split("\t")[0].strip() for line in lines[1 : count + 1]]


class HiddenStateProbe:
    """MiniLM's final hidden states on fixed sentences, and their relative error under replaced weights."""

    def __init__(self, model, sentences: list[str], batch_size: int = 64) -> None:
        from transformers import AutoTokenizer

        from peft_ismoe.backbones import minilm_path

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.model = model
        self.batches = [
            tokenizer(
                sentences[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            for i in range(0, len(sentences), batch_size)
        ]
        self.reference = self._hidden_states()

    @torch.no_grad()
    def _hidden_states(self) -> list[torch.Tensor]:
        return [self.model(**batch).last_hidden_state.float() for batch in self.batches]

    @torch.no_grad()
    def relative_error(self, weights: dict[str, torch.Tensor]) -> float:
        modules = dict(self.model.named_modules())
        originals = {name: modules[name].weight.detach().clone() for name in weights}
        try:
            for name, W in weights.items():
                modules[name].weight.copy_(W)
            hidden = self._hidden_states()
        finally:
            for name, W in originals.items():
                modules[name].weight.copy_(W)
        num = den = 0.0
        for batch, h, h_ref in zip(self.batches, hidden, self.reference, strict=True):
            mask = batch["attention_mask"].bool()  # [batch, tokens]; padding does not count
            num += float((h - h_ref)[mask].square().sum())
            den += float(h_ref[mask].square().sum())
        return math.sqrt(num / den)


# ----------------------------------------------------------------------------------------------------------------
# Runs.


def versions() -> dict[str, str]:
    import bitsandbytes
    import hqq
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hqq": getattr(hqq, "__version__", "unknown"),
        "bitsandbytes": bitsandbytes.__version__,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, {platform.system()}"


def provenance() -> dict:
    return {
        "command": "python " + shlex.join(["benchmarks/quantization.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
    }


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def full_model_path(results_dir: Path, model: str, bits: int, method: str) -> Path:
    return results_dir / f"{model}-{bits}bit-{method}.json"


def limit_layers_path(results_dir: Path, model: str, bits: int) -> Path:
    return results_dir / f"limit-layers-{model}-{bits}bit.json"


def run_full_model(model_name: str, model, weights, probe, bits: int, method: str) -> dict:
    """Quantize every layer of one model with one method; error, hidden-state error, seconds and bytes."""
    quantize = QUANTIZERS[method]
    err_sq = ref_sq = 0.0
    seconds = cpu_seconds = 0.0
    nbytes = fp16_bytes = 0
    dequantized = {}
    for index, (name, W) in enumerate(weights.items()):
        start, cpu_start = time.perf_counter(), time.process_time()
        stored = quantize(W, bits, index)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        W_hat = stored.dequantize()
        err_sq += float((W_hat - W).square().sum())
        ref_sq += float(W.square().sum())
        nbytes += stored.nbytes
        fp16_bytes += 2 * W.numel()
        if probe is not None:
            dequantized[name] = W_hat
    record = {
        "model": model_name,
        "bits": bits,
        "method": method,
        "group_size": GROUP_SIZE,
        "layers": len(weights),
        "weights": sum(W.numel() for W in weights.values()),
        "weight_error": math.sqrt(err_sq / ref_sq),
        "hidden_error": probe.relative_error(dequantized) if probe is not None else None,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "bytes": nbytes,
        "fp16_bytes": fp16_bytes,
        "fraction_of_fp16": nbytes / fp16_bytes,
    }
    return record | provenance()


def run_limit_layers(model_name: str, weights, bits: int, repeats: int) -> dict:
    """Every method and the limit on the few layers, the timings repeated with the methods interleaved."""
    names = LIMIT_LAYERS[model_name]
    subset = {name: weights[name] for name in names}
    methods = [m for m in (*METHODS, "limit") if applies(m, bits)]
    seconds = {m: [] for m in methods}
    cpu_seconds = {m: [] for m in methods}
    errors = {}
    for repeat in range(repeats):
        for method in methods:
            if method == "limit" and repeat:
                continue  # minutes per run, and only its error matters
            err_sq = ref_sq = elapsed = cpu = 0.0
            for index, W in enumerate(subset.values()):
                start, cpu_start = time.perf_counter(), time.process_time()
                stored = QUANTIZERS[method](W, bits, index)
                elapsed += time.perf_counter() - start
                cpu += time.process_time() - cpu_start
                err_sq += float((stored.dequantize() - W).square().sum())
                ref_sq += float(W.square().sum())
            seconds[method].append(elapsed)
            cpu_seconds[method].append(cpu)
            errors[method] = math.sqrt(err_sq / ref_sq)
    record = {
        "model": model_name,
        "bits": bits,
        "group_size": GROUP_SIZE,
        "layers": list(names),
        "repeats": repeats,
        "weight_error": errors,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "median_seconds": {m: statistics.median(s) for m, s in seconds.items()},
        "median_cpu_seconds": {m: statistics.median(s) for m, s in cpu_seconds.items()},
    }
    return record | provenance()


def run_all(args: argparse.Namespace) -> None:
    for model_name in args.models:
        planned = [
            (bits, method) for bits in args.bits for method in METHODS if applies(method, bits)
            if args.redo or not full_model_path(args.results_dir, model_name, bits, method).exists()
        ]  # fmt: skip
        limits = [b for b in args.bits if args.redo or not limit_layers_path(args.results_dir, model_name, b).exists()]
        if not planned and not limits:
            logger.info("%s: every result is on disk", model_name)
            continue
        model = load_model(model_name)
        weights = linear_weights(model)
        probe = HiddenStateProbe(model, sst2_sentences()) if model_name == "minilm" and planned else None
        for bits in limits:
            record = run_limit_layers(model_name, weights, bits, args.repeats)
            write_json(limit_layers_path(args.results_dir, model_name, bits), record)
            logger.info("%s %d-bit limit layers: %s", model_name, bits, record["weight_error"])
        for bits, method in planned:
            record = run_full_model(model_name, model, weights, probe, bits, method)
            write_json(full_model_path(args.results_dir, model_name, bits, method), record)
            logger.info(
                "%s %d-bit %s: error %.5f, %.1f s, %.4f of fp16",
                model_name, bits, method, record["weight_error"], record["seconds"], record["fraction_of_fp16"],
            )  # fmt: skip
        del model, weights, probe


# ----------------------------------------------------------------------------------------------------------------
# The settings sweep behind GNPIQConfig's defaults.

SWEEP = {
    "num_iterations": (5, 10, 20, 40),
    "noise_std": (0.0, 0.25, 0.5, 1.0),
    "noise_decay": (0.8, 0.9, 1.0),
    "refine_steps": (0, 1, 2, 4),
}
SWEEP_GROUP_SIZES = (32, 64, 128)


def run_sweep(args: argparse.Namespace) -> None:
    from peft_ismoe.quantization import GNPIQConfig, gnpiq_quantize, minmax_quantize

    weights = linear_weights(load_model("minilm"))
    subset = [weights[name] for name in LIMIT_LAYERS["minilm"]]

    def measure(fn: Callable) -> tuple[float, float]:
        times, err_sq, ref_sq = [], 0.0, 0.0
        for repeat in range(args.repeats):
            elapsed = 0.0
            for index, W in enumerate(subset):
                start = time.perf_counter()
                quantized = fn(W, index)
                elapsed += time.perf_counter() - start
                if repeat == 0:
                    err_sq += float((quantized.dequantize() - W).square().sum())
                    ref_sq += float(W.square().sum())
            times.append(elapsed)
        return math.sqrt(err_sq / ref_sq), statistics.median(times)

    rows = []
    for bits in args.bits:
        defaults = GNPIQConfig(bits=bits).solver_kwargs()
        for field, values in SWEEP.items():
            for value in values:
                kwargs = defaults | {field: value}
                error, seconds = measure(lambda W, i, kwargs=kwargs: gnpiq_quantize(W, seed=i, **kwargs))
                rows.append({"bits": bits, "field": field, "value": value, "error": error, "seconds": seconds})
                logger.info("sweep %d-bit %s=%s: %.5f, %.3f s", bits, field, value, error, seconds)
        for group_size in SWEEP_GROUP_SIZES:
            kwargs = defaults | {"group_size": group_size}
            error, seconds = measure(lambda W, i, kwargs=kwargs: gnpiq_quantize(W, seed=i, **kwargs))
            rtn, _ = measure(lambda W, i, b=bits, g=group_size: minmax_quantize(W, bits=b, group_size=g))
            fraction = (bits + 32 / group_size) / 16  # codes plus a float16 scale and zero per group
            rows.append(
                {"bits": bits, "field": "group_size", "value": group_size, "error": error, "seconds": seconds,
                 "rtn_error": rtn, "fraction_of_fp16": fraction}
            )  # fmt: skip
    write_json(args.results_dir / "sweep-minilm.json", {"rows": rows} | provenance())


# ----------------------------------------------------------------------------------------------------------------
# Report.


def load_records(results_dir: Path) -> tuple[dict, dict, dict | None]:
    full, limit = {}, {}
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        if path.name.startswith("limit-layers-"):
            limit[record["model"], record["bits"]] = record
        elif path.name != "sweep-minilm.json":
            full[record["model"], record["bits"], record["method"]] = record
    sweep_path = results_dir / "sweep-minilm.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.exists() else None
    return full, limit, sweep


def _cell(value: float | None, digits: int = 5) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.3f}x"


def full_model_tables(full: dict) -> list[str]:
    def get(model, bits, method, key):
        record = full.get((model, bits, method))
        return None if record is None else record.get(key)

    lines = []
    for model in MODELS:
        present = sorted({bits for (m, bits, _) in full if m == model})
        if not present:
            continue
        weights = next(r["weights"] for k, r in full.items() if k[0] == model)
        lines += [
            f"#### {model}: all {next(r['layers'] for k, r in full.items() if k[0] == model)} linear layers "
            f"({weights:,} weights)",
            "",
            "| bits | metric | rtn | hqq | nf4 | gnpiq | gnpiq / hqq | gnpiq / rtn |",
            "|---|---|---|---|---|---|---|---|",
        ]
        metrics = [("weight error", "weight_error", 5)]
        if model == "minilm":
            metrics.append(("hidden-state error", "hidden_error", 5))
        metrics += [
            ("seconds", "seconds", 1),
            ("CPU seconds", "cpu_seconds", 1),
            ("bytes / fp16 bytes", "fraction_of_fp16", 4),
        ]
        for bits in present:
            for label, key, digits in metrics:
                values = {m: get(model, bits, m, key) for m in METHODS}
                ratios = [_ratio(values["gnpiq"], values["hqq"]), _ratio(values["gnpiq"], values["rtn"])]
                if key == "fraction_of_fp16":
                    ratios = [f"target <= {bits / 16 + 0.07:.4f}", ""]
                cells = [_cell(values[m], digits) for m in METHODS]
                lines.append(f"| {bits} | {label} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    return lines


def limit_tables(limit: dict) -> list[str]:
    lines = []
    for model in MODELS:
        rows = sorted((bits, r) for (m, bits), r in limit.items() if m == model)
        if not rows:
            continue
        layers = ", ".join(f"`{name}`" for name in rows[0][1]["layers"])
        lines += [
            f"#### {model}: the limit layers ({layers})",
            "",
            f"Relative weight error, then seconds to quantize these layers: the median over {rows[0][1]['repeats']} "
            "repeats with the methods interleaved, wall clock and CPU time (the limit: one run).",
            "",
            "| bits | rtn | hqq | nf4 | gnpiq | limit | gnpiq / limit | gnpiq / hqq | gnpiq / rtn "
            "| s gnpiq | s hqq | gnpiq / hqq time | CPU s gnpiq | CPU s hqq | gnpiq / hqq CPU | s limit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for bits, r in rows:
            e, s, c = r["weight_error"], r["median_seconds"], r["median_cpu_seconds"]
            cells = [_cell(e.get(m)) for m in (*METHODS, "limit")]
            cells += [_ratio(e["gnpiq"], e["limit"]), _ratio(e["gnpiq"], e["hqq"]), _ratio(e["gnpiq"], e["rtn"])]
            cells += [_cell(s["gnpiq"], 3), _cell(s["hqq"], 3), _ratio(s["gnpiq"], s["hqq"])]
            cells += [_cell(c["gnpiq"], 3), _cell(c["hqq"], 3), _ratio(c["gnpiq"], c["hqq"]), _cell(s["limit"], 1)]
            lines.append(f"| {bits} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def sweep_tables(sweep: dict) -> list[str]:
    rows = sweep["rows"]
    lines = [
        "#### Settings sweep (GNP-IQ on the MiniLM limit layers, one setting changed at a time from the defaults)",
        "",
        "Relative weight error at 2 / 3 / 4 / 8 bits, and the median seconds summed over the four bit widths.",
        "",
        "| setting | value | 2 bits | 3 bits | 4 bits | 8 bits | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    fields = [*SWEEP, "group_size"]
    for field in fields:
        values = sorted({r["value"] for r in rows if r["field"] == field})
        for value in values:
            by_bits = {r["bits"]: r for r in rows if r["field"] == field and r["value"] == value}
            errors = [_cell(by_bits[b]["error"]) if b in by_bits else "-" for b in BITS]
            seconds = sum(r["seconds"] for r in by_bits.values())
            lines.append(f"| {field} | {value} | " + " | ".join(errors) + f" | {seconds:.2f} |")
    lines += [
        "",
        "Group size against round-to-nearest at the same group size, and the storage it costs:",
        "",
        "| group size | bits | gnpiq | rtn | gnpiq / rtn | bytes / fp16 bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["field"] == "group_size"), key=lambda r: (r["value"], r["bits"])):
        lines.append(
            f"| {r['value']} | {r['bits']} | {r['error']:.5f} | {r['rtn_error']:.5f} | "
            f"{r['error'] / r['rtn_error']:.3f}x | {r['fraction_of_fp16']:.4f} |"
        )
    lines.append("")
    return lines


def provenance_lines(records: list[dict]) -> list[str]:
    if not records:
        return []
    latest = max(records, key=lambda r: r["date"])
    commands = sorted({r["command"] for r in records})
    v = latest["versions"]
    return [
        f"Made by `{'`, `'.join(commands)}` (results in `benchmarks/results/quantization/`), "
        f"last on {latest['date']}; machine: {latest['machine']}; python {v['python']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, hqq {v['hqq']}, bitsandbytes {v['bitsandbytes']}.",
        "",
    ]


def plot(full: dict, limit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, "all linear layers") for m in MODELS if any(k[0] == m for k in full)]
    panels += [(m, "limit layers") for m in MODELS if any(k[0] == m for k in limit)]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.2), squeeze=False)
    styles = {"rtn": "o-", "hqq": "s-", "nf4": "D", "gnpiq": "^-", "limit": "k--"}
    for column, (model, kind) in enumerate(panels):
        methods = METHODS if kind == "all linear layers" else (*METHODS, "limit")
        if kind == "all linear layers":
            errors = {
                method: dict(
                    sorted((b, r["weight_error"]) for (m, b, me), r in full.items() if m == model and me == method)
                )
                for method in methods
            }
        else:
            errors = {
                method: dict(
                    sorted(
                        (b, r["weight_error"][method])
                        for (m, b), r in limit.items()
                        if m == model and method in r["weight_error"]
                    )
                )
                for method in methods
            }
        top, bottom = axes[0][column], axes[1][column]
        for method, points in errors.items():
            if not points:
                continue
            top.plot(list(points), list(points.values()), styles[method], label=method, markersize=5)
            ratios = {b: e / errors["rtn"][b] for b, e in points.items() if b in errors["rtn"]}
            bottom.plot(list(ratios), list(ratios.values()), styles[method], label=method, markersize=5)
        top.set_yscale("log")
        top.set_ylabel("relative Frobenius error of the weights")
        top.set_title(f"{model}: {kind}", fontsize=10)
        bottom.set_ylabel("error / round-to-nearest error")
        for ax in (top, bottom):
            ax.set_xticks(BITS)
            ax.set_xlabel("bits per weight code (group size 64)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results_dir: Path, doc_path: Path, figure_path: Path) -> str:
    full, limit, sweep = load_records(results_dir)
    records = [*full.values(), *limit.values(), *([sweep] if sweep else [])]
    lines = provenance_lines(records)
    lines += full_model_tables(full) + limit_tables(limit)
    if sweep:
        lines += sweep_tables(sweep)
    lines.append(f"![error against bits]({figure_path.name})")
    block = "\n".join(lines)
    if full or limit:
        plot(full, limit, figure_path)

    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = doc_path.read_text() if doc_path.exists() else f"# GNP-IQ quantization\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        raise ValueError(f"{doc_path} must hold the markers {start!r} and {end!r} around the generated tables.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc_path.write_text(f"{head}{start}\n{block}\n{end}{tail}")
    return block


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS)
    parser.add_argument("--repeats", type=int, default=5, help="Timing repeats on the limit layers (median).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads.")
    parser.add_argument("--redo", action="store_true", help="Recompute results whose file exists.")
    parser.add_argument("--report", action="store_true", help="Only rebuild the tables and the plot.")
    parser.add_argument("--sweep", action="store_true", help="Run the settings sweep (MiniLM limit layers).")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--doc-path", type=Path, default=DOC_PATH)
    parser.add_argument("--figure-path", type=Path, default=FIGURE_PATH)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        if args.sweep:
            run_sweep(args)
        elif not args.report:
            run_all(args)
    print(write_report(args.results_dir, args.doc_path, args.figure_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
