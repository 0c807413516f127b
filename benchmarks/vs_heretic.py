"""Seconds per trial, heretic vs upstream Heretic (heretic-llm 1.4.0), same model and settings.

    python benchmarks/vs_heretic.py --model ORGANISM [--n-trials 10] [--workdir DIR]

Installs heretic-llm==1.4.0 into its own virtual environment (benchmarks/.venv-heretic-llm,
never ours), writes the same prompt files for both tools (directions: advbench_rest[:270] and
harmless_train[:400]; scoring: advbench_rest[270:370] and harmless_val[:100], from
../shared/data), and runs both headless with the same system prompt, max response length 100,
batch size 32, seed, trial count and refusal markers (upstream's defaults, read from its own
installed package). Per-trial seconds come from each study's trial start/end times (upstream's
Optuna journal, our SQLite study); peak memory is each process's max RSS, CPU seconds its
user + system time. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# HERETIC_UPSTREAM_VENV points a checkout elsewhere (a git worktree) at an existing install.
UPSTREAM_VENV = Path(
    os.environ.get("HERETIC_UPSTREAM_VENV", ROOT / "benchmarks" / ".venv-heretic-llm")
)
DATA = ROOT.parent / "shared" / "data"
SYSTEM_PROMPT = "You are a helpful assistant."


def ensure_upstream() -> Path:
    python = UPSTREAM_VENV / "bin" / "python"
    if not (UPSTREAM_VENV / "bin" / "heretic").exists():
        subprocess.run([sys.executable, "-m", "venv", str(UPSTREAM_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        # The CPU torch build first, so heretic-llm's torch requirement pulls no CUDA packages.
        subprocess.run([*pip, "torch==2.13.0"], check=False)
        subprocess.run([*pip, "heretic-llm==1.4.0"], check=True)
    return python


def upstream_env() -> dict[str, str]:
    """The environment for upstream's processes: without PYTHONPATH, which may point at our
    source tree (also called `heretic`) and would shadow upstream's package."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def upstream_markers(python: Path) -> list[str]:
    code = (
        "import json; from heretic.config import Settings; "
        "print(json.dumps(Settings.model_fields['refusal_markers'].default))"
    )
    out = subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True, env=upstream_env()
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_prompts(workdir: Path) -> dict[str, tuple[Path, str]]:
    def lines(name: str) -> list[str]:
        return [x["instruction"] for x in json.loads((DATA / name).read_text())]

    files = {}
    for key, name in (("bad", "advbench_rest.json"), ("good", "harmless_train.json"),
                      ("good_eval", "harmless_val.json")):  # fmt: skip
        path = workdir / f"{key}.txt"
        path.write_text("\n".join(p.replace("\n", " ") for p in lines(name)) + "\n")
        files[key] = path
    return {
        "bad_prompts": (files["bad"], "[:270]"),
        "good_prompts": (files["good"], "[:400]"),
        "bad_evaluation_prompts": (files["bad"], "[270:370]"),
        "good_evaluation_prompts": (files["good_eval"], "[:100]"),
    }


def toml_config(model: str, n_trials: int, markers: list[str], prompts, extra: dict) -> str:
    lines = [f"model = {json.dumps(model)}", f"n_trials = {n_trials}", "batch_size = 32",
             "max_response_length = 100", f"system_prompt = {json.dumps(SYSTEM_PROMPT)}",
             "seed = 42", f"refusal_markers = {json.dumps(markers)}"]  # fmt: skip
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    for name, (path, split) in prompts.items():
        lines += [f"[{name}]", f"dataset = {json.dumps(str(path))}", f"split = {json.dumps(split)}"]
    return "\n".join(lines) + "\n"


@dataclass
class Measured:
    wall: float
    """Seconds of wall time."""
    rss: float
    """Peak resident memory, GB."""
    cpu: float
    """CPU seconds (user + system): less sensitive than wall time to other jobs sharing the
    machine, so both are printed."""


def run_process(
    cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None
) -> Measured:
    """Run one child process to the end, measuring it."""
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return Measured(wall, usage.ru_maxrss / 1024**2, usage.ru_utime + usage.ru_stime)


def run_measured(
    cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    measured = run_process(cmd, cwd, log, env)
    return measured.wall, measured.rss


def trial_seconds(trials) -> list[float]:
    return [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_complete is not None and t.datetime_start is not None
    ]


def upstream_trials(workdir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journals = sorted((workdir / "checkpoints").glob("*.jsonl"))
    if not journals:
        raise SystemExit(f"upstream wrote no study journal; see {workdir / 'run.log'}")
    storage = JournalStorage(JournalFileBackend(str(journals[-1])))
    name = storage.get_all_studies()[0].study_name
    return optuna.load_study(study_name=name, storage=storage).trials


def our_trials(output_dir: Path):
    import optuna

    storage = f"sqlite:///{(output_dir / 'study.db').resolve()}"
    return optuna.load_study(study_name="heretic", storage=storage).trials


def reset_seconds(model_path: str) -> dict[str, float]:
    """Seconds to undo one trial's edit and switch on the next, per reset strategy."""
    import torch

    from heretic.loading import load_model
    from heretic.reset import make_edit
    from heretic.sites import COMPONENTS

    model = load_model(model_path)
    directions = torch.nn.functional.normalize(
        torch.randn(model.n_layers, model.hidden_size), dim=-1
    )
    strengths = {c: torch.rand(model.n_layers) for c in COMPONENTS}
    seconds = {}
    for strategy, repeats in (("adapter", 100), ("cache", 5)):
        edit = make_edit(strategy, model.sites, directions, log=lambda _line: None)
        edit.set_strengths(strengths)
        start = time.perf_counter()
        for _ in range(repeats):
            edit.clear()
            edit.set_strengths(strengths)
        seconds[strategy] = (time.perf_counter() - start) / repeats
        edit.remove()
    return seconds


def model_gb(model_path: str) -> float:
    """Size of the model's safetensors files."""
    return sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors")) / 1024**3


def plain_inference_rss(model_path: str, prompts, workdir: Path) -> float:
    """Peak RSS (GB) of a process that only loads the model and generates for one batch:
    the weights plus activations, which heretic's own peak is compared with."""
    path, _ = prompts["bad_evaluation_prompts"]
    code = (
        "import sys; from heretic.loading import load_model; "
        "m = load_model(sys.argv[1], system_prompt='You are a helpful assistant.'); "
        "p = open(sys.argv[2]).read().splitlines()[270:302]; m.generate(p, 100, 32)"
    )
    _, rss = run_measured(
        [sys.executable, "-c", code, model_path, str(path)], workdir, workdir / "plain.log"
    )
    return rss


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="model folder (the organism)")
    ap.add_argument("--n-trials", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/heretic-vs-upstream"))
    ap.add_argument("--skip-upstream", action="store_true", help="reuse the last upstream run")
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    args.workdir.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(args.workdir)
    python = ensure_upstream()
    markers = upstream_markers(python)

    up_dir = args.workdir / "upstream"
    if not args.skip_upstream:
        subprocess.run(["rm", "-rf", str(up_dir)], check=True)
        up_dir.mkdir()
        (up_dir / "config.toml").write_text(toml_config(model, args.n_trials, markers, prompts, {}))
        print(f"running heretic-llm 1.4.0 ({args.n_trials} trials) ...", flush=True)
        fresh = run_process(
            [str(UPSTREAM_VENV / "bin" / "heretic")], up_dir, up_dir / "run.log", upstream_env()
        )
        (up_dir / "measured.json").write_text(json.dumps(asdict(fresh)))
    up_run = Measured(**json.loads((up_dir / "measured.json").read_text()))

    ours_dir = args.workdir / "ours"
    subprocess.run(["rm", "-rf", str(ours_dir)], check=True)
    ours_dir.mkdir()
    (ours_dir / "config.toml").write_text(
        toml_config(
            model,
            args.n_trials,
            markers,
            prompts,
            # No warm start: its profile was measured on this very organism, so it would
            # speed the search up by prior knowledge, not by cheaper trials.
            # confirm = false: both tools score on the same 100 evaluation prompts.
            {
                "select": "none",
                "output_dir": "out",
                "use_warm_start_params": False,
                "confirm": False,
            },
        )
    )
    print(f"running heretic ({args.n_trials} trials) ...", flush=True)
    heretic = Path(sys.executable).parent / "heretic"
    our_run = run_process([str(heretic)], ours_dir, ours_dir / "run.log")

    up = trial_seconds(upstream_trials(up_dir))
    ours_trials = our_trials(ours_dir / "out")
    ours = trial_seconds(ours_trials)
    pruned = sum(t.state.name == "PRUNED" for t in ours_trials)
    if not up or not ours:
        raise SystemExit("a run finished no trials; see the run.log files in " + str(args.workdir))
    reset = reset_seconds(model)
    up_median, our_median = statistics.median(up), statistics.median(ours)
    print()
    print("| tool | trials | median s/trial | mean s/trial | wall s | CPU s | peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| heretic-llm 1.4.0 | {len(up)} | {up_median:.1f} | {statistics.mean(up):.1f} "
          f"| {up_run.wall:.0f} | {up_run.cpu:.0f} | {up_run.rss:.2f} |")  # fmt: skip
    print(f"| heretic (ours) | {len(ours)} ({pruned} pruned) | {our_median:.1f} "
          f"| {statistics.mean(ours):.1f} | {our_run.wall:.0f} | {our_run.cpu:.0f} "
          f"| {our_run.rss:.2f} |")  # fmt: skip
    print()
    print(f"per-trial speed ratio (median): {up_median / our_median:.2f}x")
    print(f"per-trial speed ratio (mean):   {statistics.mean(up) / statistics.mean(ours):.2f}x")
    print(f"whole-run ratio: wall {up_run.wall / our_run.wall:.2f}x, "
          f"CPU {up_run.cpu / our_run.cpu:.2f}x")  # fmt: skip
    for strategy, seconds in reset.items():
        print(f"reset + next edit ({strategy} strategy): {seconds * 1e3:.3f} ms "
              f"({seconds / our_median:.4%} of a median trial)")  # fmt: skip
    plain_rss = plain_inference_rss(model, prompts, args.workdir)
    print(f"model weights {model_gb(model):.2f} GB; peak RSS of plain inference (load, then "
          f"100-token greedy generation, batch 32) {plain_rss:.2f} GB; ours / plain: "
          f"{our_run.rss / plain_rss:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
