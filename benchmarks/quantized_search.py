"""Does a search on a 4-bit model find an edit as good as a bf16 search? Runs heretic twice on
one model with the same seed and prompts, once loaded in bf16 and once with quantization =
bnb_4bit (or bnb_8bit), saves each run's best trial (merged into the checkpoint's full-precision
weights by the shard export), and re-measures both merged models in bf16 against the original.

    python benchmarks/quantized_search.py --model ORGANISM [--data ../shared/data] \
        [--quantization bnb_4bit] [--n-trials 6]

Prompts: advbench_rest.json (bad) and harmless_val.json (good) from --data, the first 120 of
each for the directions and the next 50 for the evaluation; 32-token responses, the marker
judge (the adaptive judge is learned per run, which would make the two runs' counts differ by
judge as well as by model). Prints each run's trials, then for the chosen trials the
refusals and KL the search reported next to those measured on the merged bf16 model. Tens of
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import optuna
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
N_DIRECTION, N_EVAL, LENGTH = 120, 50, 32


def prompt_files(data: Path, work: Path) -> tuple[Path, Path]:
    bad = [x["instruction"] for x in json.loads((data / "advbench_rest.json").read_text())]
    good = [x["instruction"] for x in json.loads((data / "harmless_val.json").read_text())]
    paths = work / "bad.txt", work / "good.txt"
    for path, lines in zip(paths, (bad, good), strict=True):
        path.write_text("\n".join(lines[: N_DIRECTION + N_EVAL]) + "\n")
    return paths


def argv(model: str, bad: Path, good: Path, out: Path, n_trials: int, quant: str) -> list[str]:
    split_dir, split_eval = f"[:{N_DIRECTION}]", f"[{N_DIRECTION}:{N_DIRECTION + N_EVAL}]"
    return [
        "--model", model, "--output-dir", str(out), "--quantization", quant,
        "--bad-prompts.dataset", str(bad), "--bad-prompts.split", split_dir,
        "--good-prompts.dataset", str(good), "--good-prompts.split", split_dir,
        "--bad-evaluation-prompts.dataset", str(bad),
        "--bad-evaluation-prompts.split", split_eval,
        "--good-evaluation-prompts.dataset", str(good),
        "--good-evaluation-prompts.split", split_eval,
        "--n-trials", str(n_trials), "--n-startup-trials", str(n_trials),
        "--max-response-length", str(LENGTH), "--refusal-judge", "markers",
        "--batch-size", "16", "--select", "best", "--seed", "42",
    ]  # fmt: skip


def search(args_list: list[str]) -> dict:
    from heretic.cli import run
    from heretic.config import load_settings

    started = time.perf_counter()
    settings = load_settings(args_list)
    result = run(settings, Console(stderr=True, quiet=True))
    study = optuna.load_study(study_name="heretic", storage=settings.resolved_storage())
    trials = [
        (t.number, t.user_attrs.get("refusals"), t.user_attrs.get("kl_divergence"))
        for t in study.trials
    ]
    return {
        "base": result.base_refusals,
        "chosen": result.chosen_trial,
        "refusals": result.refusals,
        "kl": result.kl_divergence,
        "trials": trials,
        "minutes": (time.perf_counter() - started) / 60,
    }


def remeasure(original: str, merged: Path, bad: Path, good: Path) -> tuple[int, float]:
    """Refusals (marker judge) and KL(original || merged) of the merged model, both in bf16,
    on the evaluation prompts the search used."""
    from heretic.config import load_settings
    from heretic.evaluation import Evaluator, kl_divergence
    from heretic.judges import MarkerJudge
    from heretic.loading import load_model

    lines = {p: p.read_text().splitlines()[N_DIRECTION:] for p in (bad, good)}
    settings = load_settings(["--model", original])  # the search's judge and system prompt
    judge = MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers)
    scored = []
    for path in (original, str(merged)):
        model = load_model(path, dtype="bfloat16", system_prompt=settings.system_prompt)
        scored.append(Evaluator(model, lines[good], lines[bad], judge, LENGTH, 16))
    return scored[1].base_refusals, kl_divergence(scored[0].base_logprobs, scored[1].base_logprobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (the organism)")
    ap.add_argument("--data", type=Path, default=DATA, help="folder with the prompt JSON files")
    ap.add_argument("--quantization", default="bnb_4bit", choices=["bnb_4bit", "bnb_8bit"])
    ap.add_argument("--n-trials", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bad, good = prompt_files(args.data, work)
        runs = {}
        for quant in ("none", args.quantization):
            out = work / quant
            runs[quant] = search(argv(args.model, bad, good, out, args.n_trials, quant))
            runs[quant]["merged"] = remeasure(args.model, out / "model", bad, good)
    names = {"none": "bf16", args.quantization: args.quantization}
    print(f"| trial | {' | '.join(f'{names[q]} refusals | {names[q]} KL' for q in runs)} |")
    print("| --- |" + " --- | --- |" * len(runs))
    rows = zip(*(r["trials"] for r in runs.values()), strict=False)
    for row in rows:
        cells = " | ".join(f"{ref}/{N_EVAL} | {kl:.4f}" for _, ref, kl in row)
        print(f"| {row[0][0]} | {cells} |")
    print()
    print(
        "| search | base refusals | chosen trial | search: refusals, KL | merged bf16 model: "
        "refusals, KL | minutes |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for quant, r in runs.items():
        refusals, kl = r["merged"]
        print(
            f"| {names[quant]} | {r['base']}/{N_EVAL} | {r['chosen']} | {r['refusals']}/{N_EVAL}, "
            f"{r['kl']:.4f} | {refusals}/{N_EVAL}, {kl:.4f} | {r['minutes']:.1f} |"
        )


if __name__ == "__main__":
    main()
