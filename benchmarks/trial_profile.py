"""Where a trial's time goes, on the organism: KL pass, screening, full-horizon decoding.

    python benchmarks/trial_profile.py --model ORGANISM [--batch-size 32] [--tokens 100]

Uses the standard split (directions from advbench_rest[:270] and harmless_train[:400]; KL on
harmless_val[:100]; refusals on advbench_rest[270:370]) and scores three edits the search
typically meets: none (the original model: mostly refusals), a weak one (still mostly
refusals) and a strong one (mostly answers, so most rows run the full horizon). For each it
prints the seconds of the KL pass with and without skipping unedited layers, of the screening
and full-horizon decoding phases (the survivors pooled into as few batches as the batch size
allows), and the rows still decoding after screening; then the time of
plain transformers greedy generation of every prompt to the full length (what a trial costs
without row dropping, screening or pruning), so the bound on a front trial's cost is visible.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from heretic.abliteration import (
    ComponentParams,
    first_edited_layer,
    strengths_from_params,
)
from heretic.config import DEFAULT_REFUSAL_MARKERS
from heretic.decoding import regroup
from heretic.directions import mean_difference
from heretic.edit import EditHooks
from heretic.evaluation import Evaluator
from heretic.judges import MarkerJudge
from heretic.loading import load_model
from heretic.search import layer_skip_budget
from heretic.sites import ATTN, MLP

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _prompts(name: str, start: int, stop: int) -> list[str]:
    return [x["instruction"] for x in json.loads((DATA / name).read_text())][start:stop]


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--screening-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)

    model = load_model(args.model, system_prompt="You are a helpful assistant.")
    bs = args.batch_size
    good = model.residuals(_prompts("harmless_train.json", 0, 400), bs)
    bad = model.residuals(_prompts("advbench_rest.json", 0, 270), bs)
    directions = mean_difference(good, bad)
    judge = MarkerJudge(tuple(DEFAULT_REFUSAL_MARKERS))
    evaluator, seconds = _timed(
        lambda: Evaluator(
            model,
            _prompts("harmless_val.json", 0, 100),
            _prompts("advbench_rest.json", 270, 370),
            judge,
            args.tokens,
            bs,
            screening_tokens=args.screening_tokens,
            layer_skip_bytes=layer_skip_budget(model.nbytes),
            log=print,
        )
    )
    print(f"original model scored in {seconds:.1f} s: {evaluator.base_refusals}/100 refusals")
    hooks = EditHooks(model.sites, directions)
    edits = {
        "none": None,
        "weak (w 0.3, layers 0.4-0.7)": ComponentParams(0.4, 0.7, 0.3),
        "strong (w 1.0, layers 0.3-0.8)": ComponentParams(0.3, 0.8, 1.0),
    }
    rows = []
    for name, params in edits.items():
        if params is None:
            hooks.clear()
            first = model.n_layers
        else:
            strengths = strengths_from_params({ATTN: params, MLP: params}, model.n_layers)
            hooks.set_strengths(strengths)
            first = first_edited_layer(strengths)
        _, kl_full = _timed(lambda: evaluator.kl(0))
        _, kl_skip = _timed(lambda first=first: evaluator.kl(first))

        decodings = evaluator._decodings()
        screen_start = time.perf_counter()
        for d in decodings:
            while not d.done and d.produced < args.screening_tokens:
                d.step()
        screening = time.perf_counter() - screen_start
        undecided = sum(len(d._active) for d in decodings)
        full_start = time.perf_counter()
        screened, decodings = decodings, regroup(decodings, bs)
        for d in decodings:
            while not d.done:
                d.step()
        full = time.perf_counter() - full_start
        refusals = judge.count(evaluator._in_prompt_order(screened))
        rows.append((name, kl_full, kl_skip, screening, undecided, full, refusals))

    print()
    print("| edit | KL pass s | KL pass s (skip) | screening s | rows left | full horizon s "
          "| refusals |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, kl_full, kl_skip, screening, undecided, full, refusals in rows:
        print(f"| {name} | {kl_full:.2f} | {kl_skip:.2f} | {screening:.2f} | {undecided}/100 "
              f"| {full:.2f} | {refusals}/100 |")  # fmt: skip

    # The strong edit is still on: every row runs until it ends or reaches the full length.
    bad_prompts = evaluator.bad_prompts
    _, plain = _timed(lambda: model.generate(bad_prompts, args.tokens, bs, is_decided=None))
    hooks.remove()
    print()
    print(f"plain greedy generation (strong edit), up to {args.tokens} tokens for every bad "
          f"prompt: {plain:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
