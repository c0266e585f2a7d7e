"""The plugin across several GPUs: device_map="auto" quantize-on-load, generation over the split, reload, data parallel.

The model is built from a Llama config of ``qwantize_hf.evaluation.shapes`` (``--shape``)
with random weights (nothing is downloaded), saved as a bf16 checkpoint with a
byte-level tokenizer and an eval text (this package's own source files), then:

1. loaded with ``MXFP4Config()`` and ``device_map="auto"`` over every visible
   GPU (accelerate's big-model inference): load time, peak and held memory
   per GPU, the device map, and which device quantized each weight (a spy on
   the load-time quantize call; it must be the device that holds the weight);
2. greedy generation across the split: tokens/s (batch 1, after a warm-up);
3. ``save_pretrained`` → reload on one GPU: every tensor bit-identical, and
   the logits compared with the split model's;
4. the perplexity eval (``eval/perplexity.py``, method ``mse``) once in one
   process and once data-parallel under ``accelerate launch`` with one process
   per GPU: the perplexities must agree to 1e-6 (relative).

Needs two or more CUDA GPUs. ``--dry-run`` runs every step on the CPU with a
tiny model of the same family (the layer map's halves both on ``"cpu"``, two
gloo processes for the data-parallel run); ``tests/test_multi_device.py``
runs it, so the script is exercised without a GPU.

Prints a table and writes ``multi_gpu_check.json`` under ``--out`` (default $OUT).

    python eval/checks/multi_gpu_check.py                 # Llama-3.2-1B shape on every visible GPU
    python eval/checks/multi_gpu_check.py --shape 8b      # Llama-3-8B shape
    python eval/checks/multi_gpu_check.py --dry-run --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

import qwantize_hf
import qwantize_hf.read_back
import qwantize_hf.replace
from qwantize_hf import MXFP4Config, MXFP4Linear
from qwantize_hf.evaluation.shapes import CONFIGS

PERPLEXITY_SCRIPT = Path(__file__).resolve().parents[1] / "perplexity.py"  # eval/perplexity.py

GIB = 2**30
BYTE_VOCAB = 256  # the byte-level tokenizer's ids; the model's vocabulary is larger, which is fine
PROMPT_LENGTH = 32
PERPLEXITY_TIMEOUT_S = 900  # per perplexity run (one process or data-parallel)
PERPLEXITY_TOLERANCE = 1e-6  # relative: the data-parallel perplexity must equal one process's
# The dry run's stand-in: Llama-3.2-1B's structure (GQA, tied embeddings, llama3 rope) at toy size.
DRY_RUN_OVERRIDES = dict(
    vocab_size=BYTE_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    bos_token_id=0,
    eos_token_id=1,
)


# --------------------------------------------------------------------------- the checkpoint


def byte_level_tokenizer():
    """A tokenizer over the 256 bytes, built offline (no hub): every text tokenizes, one id a byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def eval_text() -> str:
    """This package's own source files: an offline text, the same for a given commit."""
    package = Path(qwantize_hf.__file__).parent
    return "\n\n".join(path.read_text() for path in sorted(package.rglob("*.py")))


def build_checkpoint(config: LlamaConfig, folder: Path) -> dict:
    """Random bf16 weights + the byte tokenizer + ``eval.txt`` in ``folder`` (kept when it already holds them)."""
    saved = folder / "config.json"
    if saved.exists() and (folder / "eval.txt").exists():
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        stored = json.loads(saved.read_text())
        if all(stored.get(key) == getattr(config, key) for key in keys):
            return {"build_and_save_s": None}
        raise SystemExit(f"{folder} holds another model's checkpoint ({saved}); remove it or pass another --work")
    start = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    byte_level_tokenizer().save_pretrained(folder)
    (folder / "eval.txt").write_text(eval_text())
    return {"build_and_save_s": round(time.perf_counter() - start, 1)}


def read_files(folder: Path) -> None:
    """Read every file once so that timed loads start from the page cache."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 26):
                    pass


# --------------------------------------------------------------------------- measuring


class QuantizeSpy:
    """Records the devices of every tensor the load quantizes, by layer name (``MXFP4Config()`` quantizes
    each weight twice: as it loads, then again with its random-token statistics; the few rows it reads
    back from the checkpoint in between, to check them, are named "<layer> (read back)")."""

    def __init__(self) -> None:
        self.devices: dict[str, set[str]] = {}
        self.calls: dict[str, int] = {}

    def __enter__(self) -> QuantizeSpy:
        self.real = qwantize_hf.replace.quantize_mxfp4

        def spy(tensor: torch.Tensor, *args, **kwargs):
            name = kwargs.get("name", "?")
            self.devices.setdefault(name.removesuffix(qwantize_hf.read_back.READ_BACK), set()).add(str(tensor.device))
            self.calls[name] = self.calls.get(name, 0) + 1
            return self.real(tensor, *args, **kwargs)

        qwantize_hf.replace.quantize_mxfp4 = spy  # the load-time op
        qwantize_hf.read_back.quantize_mxfp4 = spy  # the random-token pass that reads each weight back
        return self

    def __exit__(self, *exc) -> None:
        qwantize_hf.replace.quantize_mxfp4 = self.real
        qwantize_hf.read_back.quantize_mxfp4 = self.real


def gpu_indices() -> list[int]:
    return list(range(torch.cuda.device_count()))


def reset_memory(gpus: list[int]) -> None:
    for index in gpus:
        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)
    if gpus:
        torch.cuda.empty_cache()


def memory_by_gpu(gpus: list[int]) -> dict[str, dict[str, float]]:
    """Peak and held GiB per GPU since the last reset (empty on CPU)."""
    return {
        f"cuda:{i}": {
            "peak_gib": round(torch.cuda.max_memory_allocated(i) / GIB, 3),
            "held_gib": round(torch.cuda.memory_allocated(i) / GIB, 3),
        }
        for i in gpus
    }


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)  # ru_maxrss is KiB on Linux


def timed_load(source: Path, gpus: list[int], **kwargs) -> tuple[torch.nn.Module, float, dict]:
    reset_memory(gpus)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    for index in gpus:
        torch.cuda.synchronize(index)
    seconds = time.perf_counter() - start
    return model, seconds, memory_by_gpu(gpus)


def first_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(first_device(model))).logits.float().cpu()


def state_on_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def first_difference(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """None when both hold the same names, dtypes and bytes; else the first difference."""
    if expected.keys() != got.keys():
        return f"names differ: {sorted(set(expected) ^ set(got))[:3]}"
    for name, tensor in expected.items():
        if tensor.dtype != got[name].dtype or not torch.equal(tensor, got[name]):
            return name
    return None


def mapped_device(name: str, device_map: dict[str, str]) -> str:
    """The device_map entry that covers module ``name`` (the longest matching prefix)."""
    covering = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    value = device_map[max(covering, key=len)]
    return f"cuda:{value}" if value.isdigit() else value


def placement(model: torch.nn.Module, spy: QuantizeSpy) -> dict:
    """Where every quantized weight lives, and whether the spy saw it quantized right there.

    A weight that accelerate offloads to the CPU sits on the meta device with its
    bytes in a hook; its home is then the device map's entry.
    """
    device_map = {k: str(v) for k, v in getattr(model, "hf_device_map", {"": "cpu"}).items()}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, MXFP4Linear)}
    held_on = {
        name: mapped_device(name, device_map) if m.weight.device.type == "meta" else str(m.weight.device)
        for name, m in quantized.items()
    }
    elsewhere = [name for name, device in held_on.items() if spy.devices.get(name) != {device}]
    passes = 2 if getattr(model.config.quantization_config, "calibration", None) else 1
    whole = sum(spy.calls.get(name, 0) for name in quantized)
    by_device: dict[str, int] = {}
    for device in held_on.values():
        by_device[device] = by_device.get(device, 0) + 1
    return {
        "quantized_layers": len(quantized),
        "quantize_calls": whole,
        "quantized_layers_by_device": dict(sorted(by_device.items())),
        "quantized_elsewhere_than_held": elsewhere,
        "each_weight_quantized_on_its_device": not elsewhere and whole == passes * len(quantized),
    }


def generation_speed(model: torch.nn.Module, vocab_size: int, new_tokens: int, gpus: list[int]) -> dict:
    """Greedy decode of ``new_tokens`` tokens at batch 1 across the split, after a short warm-up."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab_size, (1, PROMPT_LENGTH), generator=generator).to(first_device(model))
    # min_new_tokens: a random model may emit its end-of-sequence token early; the count must be exact
    options = dict(do_sample=False, pad_token_id=0, min_new_tokens=new_tokens)
    model.generate(ids, max_new_tokens=new_tokens, **options)  # warm-up: kernels, caches, allocator
    for index in gpus:
        torch.cuda.synchronize(index)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, **options)
    for index in gpus:
        torch.cuda.synchronize(index)
    seconds = time.perf_counter() - start
    generated = int(out.shape[1] - PROMPT_LENGTH)
    return {
        "prompt_tokens": PROMPT_LENGTH,
        "new_tokens": generated,
        "generate_s": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 2),
    }


# --------------------------------------------------------------------------- data-parallel perplexity


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def perplexity_check(folder: Path, work: Path, processes: int, args: argparse.Namespace) -> dict:
    """eval/perplexity.py once in one process and once under ``accelerate launch`` with ``processes`` processes."""
    common = [
        str(PERPLEXITY_SCRIPT), "--model", str(folder), "--text", str(folder / "eval.txt"),
        "--methods", "mse", "--tokens", str(args.ppl_tokens), "--context-length", str(args.ppl_context),
        "--stride", str(args.ppl_context // 2), "--no-card", "--no-progress",
    ]  # fmt: skip
    if args.dry_run:
        common += ["--device", "cpu", "--dtype", "float32"]
    # The runs start in `work`, where a relative PYTHONPATH would miss: give them this process's qwantize_hf.
    package_root = str(Path(qwantize_hf.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    # accelerate starts several processes through its multi-GPU launcher (torchrun), also on CPU,
    # where each joins a gloo group; `--cpu --num_processes N` would start one.
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    runs = {}
    for label, prefix, extra_env in [
        ("single", [sys.executable], {"CUDA_VISIBLE_DEVICES": "0"} if not args.dry_run else {}),
        ("data_parallel", launch, {}),
    ]:
        out_dir = work / f"ppl-{label}"
        command = [*prefix, *common, "--output-dir", str(out_dir), "--name", "ppl"]
        start = time.perf_counter()
        # A data-parallel hang must end the check, not the lease.
        done = subprocess.run(
            command, env={**env, **extra_env}, capture_output=True, text=True, cwd=work, timeout=PERPLEXITY_TIMEOUT_S
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"the {label} perplexity run failed ({done.returncode}):\n{done.stderr[-4000:]}")
        run = json.loads((out_dir / "ppl.json").read_text())
        runs[label] = {"run": run, "command": " ".join(command), "process_wall_s": round(seconds, 1)}
    single, parallel = runs["single"]["run"], runs["data_parallel"]["run"]
    methods = {}
    for one, many in zip(single["methods"], parallel["methods"]):
        relative = abs(many["perplexity"] - one["perplexity"]) / one["perplexity"]
        methods[one["method"]] = {
            "perplexity_single": one["perplexity"],
            "perplexity_data_parallel": many["perplexity"],
            "relative_difference": relative,
            "tokens_single": one["tokens_scored"],
            "tokens_data_parallel": many["tokens_scored"],
            "eval_s_single": round(one["eval_time_s"], 2),
            "eval_s_data_parallel": round(many["eval_time_s"], 2),
        }
    equal = all(
        m["relative_difference"] <= PERPLEXITY_TOLERANCE and m["tokens_single"] == m["tokens_data_parallel"]
        for m in methods.values()
    )
    return {
        "processes": parallel.get("processes"),
        "tokens": single["tokens_scored"],
        "context_length": single["context_length"],
        "compute_dtype": single["compute_dtype"],
        "tolerance": PERPLEXITY_TOLERANCE,
        "methods": methods,
        "equal": equal and parallel.get("processes") == processes,
        "commands": {label: r["command"] for label, r in runs.items()},
        "process_wall_s": {label: r["process_wall_s"] for label, r in runs.items()},
    }


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temp dir)")
    parser.add_argument("--shape", choices=sorted(CONFIGS), default="1b",
                        help="Llama shape from qwantize_hf.evaluation.shapes")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a smaller model)")
    parser.add_argument("--max-memory-per-gpu", default=None,
                        help="max_memory for each GPU, e.g. 3GiB (default: what accelerate finds free)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated for the tokens/s figure")
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--ppl-context", type=int, default=1024)
    parser.add_argument("--no-perplexity", action="store_true", help="skip the data-parallel perplexity check")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU with a tiny model: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.new_tokens = min(args.new_tokens, 8)
        args.ppl_tokens, args.ppl_context = min(args.ppl_tokens, 400), min(args.ppl_context, 64)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    gpus = [] if args.dry_run else gpu_indices()
    if not args.dry_run and len(gpus) < 2:
        raise SystemExit(f"this check needs 2 or more CUDA GPUs (found {len(gpus)}); --dry-run runs it on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="multi_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    bf16_dir, mxfp4_dir = work / "bf16", work / "mxfp4"

    shape = {**CONFIGS[args.shape], **(DRY_RUN_OVERRIDES if args.dry_run else {})}
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape)
    results: dict = {
        "machine": (
            f"{len(gpus)}x {torch.cuda.get_device_name(0)}" if gpus else f"CPU only (dry run), {os.cpu_count()} cores"
        ),
        "dry_run": args.dry_run,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "qwantize_hf": qwantize_hf.__version__,
            "python": platform.python_version(),
        },
        "model": f"Llama shape {args.shape}" + (" (tiny dry-run size)" if args.dry_run else "")
        + f", {config.num_hidden_layers} layers, random bf16 weights",
    }
    results.update(build_checkpoint(config, bf16_dir))
    read_files(bf16_dir)

    if gpus:
        # Compile the Triton quantize kernel on every GPU before timing (a one-time cost per process).
        for index in gpus:
            qwantize_hf.quantize_mxfp4(torch.randn(256, 1024, device=f"cuda:{index}", dtype=torch.bfloat16))
        load_kwargs = {"device_map": "auto"}
        if args.max_memory_per_gpu:
            load_kwargs["max_memory"] = {**dict.fromkeys(gpus, args.max_memory_per_gpu), "cpu": "200GiB"}
    else:
        # One entry per layer, all on the CPU: a CPU cannot dispatch to a second device ("cpu:0" next
        # to "cpu" breaks accelerate's dispatch for any model; "meta" loads nothing).
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": "cpu" for i in range(config.num_hidden_layers)})
        load_kwargs = {"device_map": device_map}

    # 1. quantize on load across the GPUs
    with QuantizeSpy() as spy:
        model, load_s, memory = timed_load(bf16_dir, gpus, quantization_config=MXFP4Config(), **load_kwargs)
    device_map = {k: str(v) for k, v in getattr(model, "hf_device_map", {"": "cpu"}).items()}
    results["split_load"] = {
        "load_s": round(load_s, 2),
        "memory_by_gpu": memory,
        "devices": sorted(set(device_map.values())),
        "device_map": device_map,
        "footprint_gib": round(model.get_memory_footprint() / GIB, 3),
        **placement(model, spy),
    }
    if gpus and len(results["split_load"]["devices"]) < 2:
        print("warning: device_map='auto' put the whole model on one GPU; pass --max-memory-per-gpu to split it")
    ids = torch.randint(0, BYTE_VOCAB, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(1))
    split_logits = logits_of(model, ids)

    # 2. generation across the split
    results["generation"] = generation_speed(model, BYTE_VOCAB, args.new_tokens, gpus)

    # 3. save, then reload on one device
    start = time.perf_counter()
    model.save_pretrained(mxfp4_dir)
    results["save_s"] = round(time.perf_counter() - start, 2)
    split_state = state_on_cpu(model)
    del model
    read_files(mxfp4_dir)
    one_device = {"": 0} if gpus else {"": "cpu"}
    with QuantizeSpy() as reload_spy:
        reloaded, reload_s, reload_memory = timed_load(mxfp4_dir, gpus, device_map=one_device)
    difference = first_difference(split_state, state_on_cpu(reloaded))
    reload_logits = logits_of(reloaded, ids)
    results["reload_one_device"] = {
        "device_map": {k: str(v) for k, v in one_device.items()},
        "load_s": round(reload_s, 2),
        "memory_by_gpu": reload_memory,
        "requantized": sum(reload_spy.calls.values()),
        "bit_identical": difference is None,
        "first_difference": difference,
        "logits_equal_split": bool(torch.equal(reload_logits, split_logits)),
        "logits_max_abs_diff": float((reload_logits - split_logits).abs().max()),
    }
    del reloaded, split_state
    if gpus:
        torch.cuda.empty_cache()
    results["peak_rss_gib"] = peak_rss_gib()

    # 4. data-parallel perplexity
    if not args.no_perplexity:
        processes = 2 if args.dry_run else len(gpus)
        results["perplexity"] = perplexity_check(bf16_dir, work, processes, args)

    checks = {
        "each_weight_quantized_on_its_device": results["split_load"]["each_weight_quantized_on_its_device"],
        "generation_length": results["generation"]["new_tokens"] == args.new_tokens,
        "reload_bit_identical": results["reload_one_device"]["bit_identical"],
        "reload_not_requantized": results["reload_one_device"]["requantized"] == 0,
    }
    if "perplexity" in results:
        checks["data_parallel_perplexity_equal"] = results["perplexity"]["equal"]
    results["checks"] = checks
    results["all_checks_pass"] = all(checks.values())
    (args.out / "multi_gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return results


def print_table(results: dict) -> None:
    split, reload, generation = results["split_load"], results["reload_one_device"], results["generation"]
    print(f"\n{results['machine']}; torch {results['versions']['torch']}, "
          f"transformers {results['versions']['transformers']}; {results['model']}\n")
    gpus = list(split["memory_by_gpu"]) or ["(no GPU)"]
    print(f"| {'step':<40} | {'load time':>9} | " + " | ".join(f"{g + ' peak / held GiB':>24}" for g in gpus) + " |")
    print(f"|{'-' * 42}|{'-' * 11}|" + "|".join("-" * 26 for _ in gpus) + "|")
    for label, step in [(f"quantize-on-load over {split['devices']}", split), ("reload on one device", reload)]:
        cells = [f"{m['peak_gib']:>11.3f} / {m['held_gib']:<10.3f}" for m in step["memory_by_gpu"].values()]
        cells += [f"{'—':>24}"] * (len(gpus) - len(cells))
        print(f"| {label:<40} | {step['load_s']:>7.2f} s | " + " | ".join(cells) + " |")
    print(f"\nquantized layers by device: {split['quantized_layers_by_device']}; each quantized on its own "
          f"device: {split['each_weight_quantized_on_its_device']}")
    print(f"generation across the split: {generation['new_tokens']} tokens in {generation['generate_s']} s "
          f"= {generation['tokens_per_s']} tokens/s (batch 1, greedy)")
    print(f"reload bit-identical: {reload['bit_identical']}; logits equal the split model's: "
          f"{reload['logits_equal_split']} (max |diff| {reload['logits_max_abs_diff']:.3g})")
    if "perplexity" in results:
        ppl = results["perplexity"]
        for method, m in ppl["methods"].items():
            print(f"perplexity {method}: 1 process {m['perplexity_single']:.6f}, {ppl['processes']} processes "
                  f"{m['perplexity_data_parallel']:.6f} (rel. diff {m['relative_difference']:.2e}; eval "
                  f"{m['eval_s_single']} s vs {m['eval_s_data_parallel']} s)")
    print(f"\nall checks pass: {results['all_checks_pass']} {results['checks']}")


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["all_checks_pass"] else 1)
