"""Peak memory of saving a merged model: shard by shard vs load + save_pretrained.

    python benchmarks/export_memory.py [--size-gb 1.8] [--shards 4] [--workdir DIR] [--keep]

Writes a random bf16 Llama checkpoint of about `--size-gb` in `--shards` shards (tensor by
tensor, so building it needs little memory) and a saved edit (per-layer directions and
strengths editing every layer's o_proj and down_proj: the most tensors a trial can edit).
Then, each in a fresh subprocess, so that one's memory cannot hide in the other's:

- shards: what heretic's default export does, from the saved edit alone: the model's edit
  sites come from a narrow twin built from its config (same layers and names, no weights), the
  edit is planned against the checkpoint and written with `shard_export.save_edited_checkpoint`;
- in_memory: `from_pretrained`, `merge_edit`, `save_pretrained` (the export_method =
  "in_memory" path, which needs the loaded model).

For each it prints the peak RSS (VmHWM), the RSS after imports (the Python + torch +
transformers floor any heretic process has), the seconds, and the peak as a fraction of the
checkpoint's size (the goal for shards is at most 0.35); then checks that both outputs hold the
same tensors, bit for bit. It refuses to start without enough free memory or disk.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def _config(size_gb: float):
    """A Llama shape of about `size_gb` in bf16 (the layer count is what varies)."""
    from transformers import LlamaConfig

    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV_HEADS // HEADS
    per_layer += 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    n_layers = max(2, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=n_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def build_checkpoint(folder: Path, size_gb: float, n_shards: int) -> int:
    """Random bf16 weights in `n_shards` shards with an index; returns the bytes of tensors."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = _config(size_gb)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in meta.named_parameters()}
    total = sum(math.prod(s) * 2 for s in shapes.values())
    budget, groups, current, size = total / n_shards, [], {}, 0
    for name, shape in shapes.items():
        if current and size + math.prod(shape) * 2 > budget * 1.02 and len(groups) < n_shards - 1:
            groups.append(current)
            current, size = {}, 0
        current[name] = shape
        size += math.prod(shape) * 2
    groups.append(current)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _random(shape, gen) for name, shape in group.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, file)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    return total


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms
        return torch.ones(shape, dtype=torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def save_edit(path: Path, n_layers: int) -> None:
    from heretic.sites import COMPONENTS

    gen = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(n_layers, HIDDEN, generator=gen), dim=-1)
    strengths = {
        COMPONENTS[0]: torch.full((n_layers,), 1.0),
        COMPONENTS[1]: torch.full((n_layers,), 0.8),
    }
    torch.save({"directions": directions, "strengths": strengths}, path)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _rss_now() -> int:
    return _status_kb("VmRSS")


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: after fork + exec that also counts
    the parent's RSS at the fork, which here holds the freshly built checkpoint's pages."""
    return _status_kb("VmHWM")


def twin_sites(config) -> list:
    """The edit sites of a narrow twin of the model (same layers and module names, a few MB):
    all the shard export needs of the model's structure, without its weights. (heretic itself
    uses the sites of the model it searched on.)"""
    import copy

    from transformers import AutoModelForCausalLM

    from heretic.discovery import find_decoder_layers, find_sites

    small = copy.deepcopy(config)
    small.update({"hidden_size": 64, "intermediate_size": 128, "vocab_size": 256,
                  "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16})  # fmt: skip
    model = AutoModelForCausalLM.from_config(small, dtype=torch.float32)
    return find_sites(model, find_decoder_layers(model), small.hidden_size)


def child(mode: str, workdir: Path) -> None:
    """One export in this process; prints a JSON line with its memory and time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from heretic.discovery import find_decoder_layers, find_sites
    from heretic.edit import TrialEdit, merge_edit
    from heretic.shard_edits import plan_shard_export
    from heretic.shard_export import save_edited_checkpoint

    saved = torch.load(workdir / "edit.pt")
    edit = TrialEdit(saved["strengths"], saved["directions"])
    source, out = workdir / "source", workdir / f"out-{mode}"
    baseline = _rss_now()
    start = time.perf_counter()
    if mode == "shards":
        sites = twin_sites(AutoConfig.from_pretrained(source))
        _, edits = plan_shard_export(str(source), sites, edit)
        edited = len(save_edited_checkpoint(source, edits, out).edited)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        sites = find_sites(model, find_decoder_layers(model), model.config.hidden_size)
        edited = len(merge_edit(sites, edit))
        model.save_pretrained(out)
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    print(json.dumps({"peak": peak, "baseline": baseline, "seconds": seconds, "edited": edited}))


def _run_child(mode: str, workdir: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"{mode} export failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> int:
    """Tensors of two checkpoints, one at a time: the number that differ in any bit."""
    from heretic.shard_export import read_checkpoint

    def locations(folder: Path) -> dict[str, Path]:
        return {t.name: s.path for s in read_checkpoint(folder).shards for t in s.tensors}

    from safetensors import safe_open

    left, right = locations(a), locations(b)
    if set(left) != set(right):
        return len(set(left) ^ set(right))
    differ = 0
    for name, path in left.items():
        with safe_open(path, "pt") as f, safe_open(right[name], "pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
        differ += not torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    return differ


def _check_resources(workdir: Path, size_gb: float) -> None:
    import psutil

    available = psutil.virtual_memory().available / 1e9
    free_disk = shutil.disk_usage(workdir).free / 1e9
    if available < 2.5 * size_gb + 1:
        sys.exit(f"Only {available:.1f} GB of memory free; need {2.5 * size_gb + 1:.1f}.")
    if free_disk < 3.2 * size_gb:
        sys.exit(f"Only {free_disk:.1f} GB of disk free in {workdir}; need {3.2 * size_gb:.1f}.")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-gb", type=float, default=1.8)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and both outputs")
    ap.add_argument("--child", choices=("shards", "in_memory"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="export-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _check_resources(workdir, args.size_gb)
    try:
        (workdir / "source").mkdir(exist_ok=True)
        start = time.perf_counter()
        size = build_checkpoint(workdir / "source", args.size_gb, args.shards)
        n_layers = _config(args.size_gb).num_hidden_layers
        save_edit(workdir / "edit.pt", n_layers)
        n_files = len(list((workdir / "source").glob("*.safetensors")))
        print(
            f"checkpoint: {size / 1e9:.2f} GB bf16, {n_layers} layers, {n_files} shards "
            f"(built in {time.perf_counter() - start:.0f} s)"
        )
        results = {mode: _run_child(mode, workdir) for mode in ("shards", "in_memory")}
        print(f"{'export':<10} {'peak RSS':>9} {'after imports':>14} {'seconds':>8} peak/size")
        for mode, r in results.items():
            print(
                f"{mode:<10} {r['peak'] / 1e9:>7.2f}GB {r['baseline'] / 1e9:>12.2f}GB "
                f"{r['seconds']:>8.1f} {r['peak'] / size:>10.3f}"
            )
        ratio = results["shards"]["peak"] / size
        own = (results["shards"]["peak"] - results["shards"]["baseline"]) / size
        print(
            f"shards: peak RSS {ratio:.3f} of the checkpoint ({own:.3f} above the import floor), "
            f"{results['shards']['peak'] / results['in_memory']['peak']:.2f}x save_pretrained's; "
            f"goal <= 0.35: {'met' if ratio <= 0.35 else 'NOT met'}"
        )
        differ = compare(workdir / "out-shards", workdir / "out-in_memory")
        print(f"outputs: {results['shards']['edited']} edited tensors; {differ} tensors differ")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
