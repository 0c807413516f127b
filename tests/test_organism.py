"""End to end on the refusing organism: refusals drop, and the saved model reloads and generates.

Built once and cached (see conftest.organism). Small evaluation sets and short responses keep
this to a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from heretic.cli import run
from heretic.config import load_settings
from heretic.evaluate import evaluate
from heretic.judges import MarkerJudge
from heretic.loading import load_model

pytestmark = pytest.mark.slow


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _prompt_sets(tmp_path: Path) -> tuple[Path, Path]:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if (shared / "advbench_rest.json").is_file():
        bad = [x["instruction"] for x in json.loads((shared / "advbench_rest.json").read_text())]
        good = [x["instruction"] for x in json.loads((shared / "harmless_val.json").read_text())]
        return _write(tmp_path / "bad.txt", bad[:150]), _write(tmp_path / "good.txt", good[:150])
    from heretic.demo_organism import demo_data_path

    bad = demo_data_path("harmful.txt").read_text().splitlines()
    good = demo_data_path("harmless.txt").read_text().splitlines()
    return _write(tmp_path / "bad.txt", bad[:120] + bad[200:230]), _write(
        tmp_path / "good.txt", good[300:450]
    )


def test_abliterating_the_organism_removes_refusals(organism, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad, good = _prompt_sets(tmp_path)
    out = tmp_path / "out"
    # fmt: off
    argv = [
        "--model", str(organism),
        "--bad-prompts.dataset", str(bad), "--bad-prompts.split", "[:120]",
        "--good-prompts.dataset", str(good), "--good-prompts.split", "[:120]",
        "--bad-evaluation-prompts.dataset", str(bad), "--bad-evaluation-prompts.split", "[120:150]",
        "--good-evaluation-prompts.dataset", str(good),
        "--good-evaluation-prompts.split", "[120:150]",
        "--n-trials", "6", "--n-startup-trials", "6",
        "--max-response-length", "24", "--batch-size", "32",
        "--confirmation-response-length", "96",
        "--select", "best", "--output-dir", str(out),
    ]
    # fmt: on
    result = run(load_settings(argv), Console(file=open("/dev/null", "w")))  # noqa: SIM115
    n_bad = result.n_bad_evaluation_prompts
    assert n_bad == 24, "the held-out confirmation takes 6 of the 30 evaluation prompts"
    assert result.base_refusals >= 2 * n_bad // 3, "the organism should refuse most of them"
    assert result.refusals is not None and result.refusals <= result.base_refusals // 2
    assert result.kl_divergence is not None and result.kl_divergence < 1.0

    # Held out: 96-token responses decoded to the end, on prompts the search never saw.
    assert result.figures is not None
    held, perplexity = result.figures["held_out"], result.figures["perplexity"]
    assert held["n_bad_prompts"] == 6 and held["base_refusals"] >= 4
    assert held["refusals"] <= held["base_refusals"] and held["kl_divergence"] < 1.0
    # The edited model finds the original's own greedy answers less likely than it does.
    assert perplexity["edited"]["cross_entropy"] > perplexity["original"]["cross_entropy"]
    meta = json.loads((out / "heretic_metadata.json").read_text())
    assert meta["held_out"] == held and "| held out |" in (out / "model" / "README.md").read_text()

    saved = load_model(str(out / "model"), system_prompt="You are a helpful assistant.")
    prompts = bad.read_text().splitlines()[120:130]
    responses = saved.generate(prompts, 24, 10)
    assert all(isinstance(r, str) and r.strip() for r in responses)
    judge = MarkerJudge(tuple(load_settings([]).refusal_markers))
    assert judge.count(responses) < 10

    # `heretic evaluate` on the saved model, with the run's settings: the run's held-out
    # figures again, found from the output's own metadata (base from heretic_metadata.json).
    evaluate(
        load_settings(["--evaluate-model", str(out / "model"), *argv[2:]]),
        Console(file=open("/dev/null", "w")),  # noqa: SIM115
    )
    report = json.loads((out / "evaluation-model.json").read_text())
    assert report["base_model"] == str(organism)
    evaluated = report["groups"]["held_out"]
    assert evaluated["n_bad_prompts"] == 6 and evaluated["base"]["refusals"] >= 4
    assert evaluated["base"]["marker_refusals"] == held["base_marker_refusals"]
    assert evaluated["evaluated"]["refusals"] <= held["refusals"] + 1
    assert evaluated["kl_divergence"] == pytest.approx(held["kl_divergence"], rel=0.25, abs=0.01)
    assert report["groups"]["evaluation"]["n_bad_prompts"] == n_bad
