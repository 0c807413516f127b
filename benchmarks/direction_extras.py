"""Do the direction extras help? Plain directions vs probes, helpfulness, sacred, all of them.

    python benchmarks/direction_extras.py --model ORGANISM [--n-trials 10] [--workdir DIR]

Runs the heretic pipeline in-process once per configuration, with the same prompts, seed,
trial count, batch size 32 and 48-token responses, headless (`--select none`). Prompts
(offline, local files): directions from advbench_rest[:270] (bad) and harmless_train[:400]
(good), refusals on advbench_rest[270:370], KL divergence on harmless_val[:100] (all from
../shared/data); helpful prompts harmless_train[400:600]; unhelpful text and the sacred
baseline are the 100 lines of plain prose in benchmarks/data/prose.txt; sacred prompts are
the first 70 of the 120 short knowledge questions in benchmarks/data/knowledge.txt. The last
50 questions, which no configuration sees, measure capability damage: the first-token KL
divergence of the edited model on them, at the trial with the fewest refusals (ties: lowest
KL). Prints one table row per configuration.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LOCAL = ROOT / "benchmarks" / "data"
CAPABILITY = (LOCAL / "knowledge.txt", "[70:120]")

NOTES = r"(probe labels: .*|kept\): .*|probing skipped.*|mean \|cos\| between .*)"
"""Lines of a run's log worth printing under the table."""

CONFIGS: dict[str, dict[str, bool]] = {
    "plain": {},
    "+probes": {"use_supervised_probing": True},
    "+helpfulness": {"orthogonalize_directions": True},
    "+sacred": {"use_sacred_directions": True},
    "all": {
        "use_supervised_probing": True,
        "orthogonalize_directions": True,
        "use_sacred_directions": True,
    },
}


def prompt_specs() -> dict[str, dict[str, str]]:
    def spec(path: Path, split: str) -> dict[str, str]:
        return {"dataset": str(path), "split": split}

    return {
        "bad_prompts": spec(DATA / "advbench_rest.json", "[:270]"),
        "good_prompts": spec(DATA / "harmless_train.json", "[:400]"),
        "bad_evaluation_prompts": spec(DATA / "advbench_rest.json", "[270:370]"),
        "good_evaluation_prompts": spec(DATA / "harmless_val.json", "[:100]"),
        "helpful_prompts": spec(DATA / "harmless_train.json", "[400:600]"),
        "unhelpfulness_prompts": spec(LOCAL / "prose.txt", "[:100]"),
        "sacred_prompts": spec(LOCAL / "knowledge.txt", "[:70]"),
        "sacred_baseline_prompts": spec(LOCAL / "prose.txt", "[:100]"),
    }


def lowest_refusals(study):
    """The finished trial with the fewest refusals, the lowest KL among those."""
    from heretic.optimization import objectives, pareto_front

    return min(
        pareto_front(study), key=lambda t: (objectives(t).refusals, objectives(t).kl_divergence)
    )


def capability_kl(model, base_logprobs, prompts, directions, trial) -> float:
    """First-token KL on the held-out knowledge questions with the trial's edit on."""
    from heretic.abliteration import strengths_from_params
    from heretic.edit import EditHooks
    from heretic.evaluation import kl_divergence
    from heretic.optimization import params_from_trial

    hooks = EditHooks(model.sites, directions)
    try:
        hooks.set_strengths(strengths_from_params(params_from_trial(trial), model.n_layers))
        with torch.inference_mode():
            logprobs = model.first_token_logprobs(prompts, 32)
        return kl_divergence(base_logprobs, logprobs)
    finally:
        hooks.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out-extras")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    import optuna

    from heretic.cli import run
    from heretic.config import DatasetSpecification, load_settings
    from heretic.directions import DIRECTIONS_FILE, load_directions
    from heretic.loading import load_model
    from heretic.optimization import objectives
    from heretic.prompts import load_prompts

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    capability = load_prompts(
        DatasetSpecification(dataset=str(CAPABILITY[0]), split=CAPABILITY[1]), "capability"
    )
    base_model = None
    rows = []
    for name in args.only:
        out = args.workdir / name.strip("+")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        settings = load_settings(
            [],
            model=args.model,
            output_dir=out,
            n_trials=args.n_trials,
            batch_size=32,
            max_response_length=48,
            seed=42,
            select="none",
            confirm=False,  # the search scores on the whole evaluation sets, as measured before
            device_map="cpu",
            **prompt_specs(),
            **CONFIGS[name],
        )
        log_path = out / "run.log"
        started = time.perf_counter()
        with open(log_path, "w") as log:
            result = run(settings, Console(file=log, width=200))
        seconds = time.perf_counter() - started
        study = optuna.load_study(study_name="heretic", storage=settings.resolved_storage())
        best = lowest_refusals(study)
        if base_model is None:
            base_model = load_model(
                args.model, device_map="cpu", system_prompt=settings.system_prompt
            )
            with torch.inference_mode():
                base_logprobs = base_model.first_token_logprobs(capability, 32)
        directions, _ = load_directions(out / DIRECTIONS_FILE)
        cap = capability_kl(base_model, base_logprobs, capability, directions, best)
        notes = re.findall(NOTES, log_path.read_text())
        rows.append((name, result.base_refusals, best, cap, seconds, notes))
        print(
            f"{name}: refusals {objectives(best).refusals}/{result.n_bad_evaluation_prompts} "
            f"KL {objectives(best).kl_divergence:.4f} capability KL {cap:.4f} ({seconds:.0f} s)",
            flush=True,
        )

    print()
    print(f"{args.n_trials} trials per configuration, seed 42, 48-token responses, batch 32")
    print()
    print("| configuration | base refusals | best refusals | KL at best | capability KL | time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, base, best, cap, seconds, _ in rows:
        print(
            f"| {name} | {base}/100 | {objectives(best).refusals}/100 | "
            f"{objectives(best).kl_divergence:.4f} | "
            f"{cap:.4f} | {seconds / 60:.1f} min |"
        )
    print()
    for name, *_, notes in rows:
        for note in notes:
            print(f"{name}: {note}")


if __name__ == "__main__":
    main()
