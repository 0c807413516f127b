"""Did a refactor change the search? Runs the organism end-to-end configuration of
tests/test_organism.py with two checkouts of heretic and compares every trial's refusals and KL.

    python benchmarks/same_trials.py --model ORGANISM --old /path/to/old/checkout [--new .]

Each checkout runs in its own process with its `src` first on PYTHONPATH (the same venv), 6
trials, the same seed, prompts from ../shared/data. Prints one row per trial and whether the
two runs agree exactly. Minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

_RUN = """
import json, sys
from pathlib import Path
import optuna
from rich.console import Console
from heretic.cli import run
from heretic.config import load_settings
organism, work, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
bad = [x["instruction"] for x in json.loads((data / "advbench_rest.json").read_text())][:150]
good = [x["instruction"] for x in json.loads((data / "harmless_val.json").read_text())][:150]
(work / "bad.txt").write_text("\\n".join(bad) + "\\n")
(work / "good.txt").write_text("\\n".join(good) + "\\n")
b, g, out = str(work / "bad.txt"), str(work / "good.txt"), work / "out"
argv = ["--model", organism,
    "--bad-prompts.dataset", b, "--bad-prompts.split", "[:120]",
    "--good-prompts.dataset", g, "--good-prompts.split", "[:120]",
    "--bad-evaluation-prompts.dataset", b, "--bad-evaluation-prompts.split", "[120:150]",
    "--good-evaluation-prompts.dataset", g, "--good-evaluation-prompts.split", "[120:150]",
    "--n-trials", "6", "--n-startup-trials", "6", "--max-response-length", "24",
    "--batch-size", "32", "--select", "best", "--output-dir", str(out)]
result = run(load_settings(argv), Console(file=open("/dev/null", "w")))
study = optuna.load_study(study_name="heretic", storage=f"sqlite:///{out}/study.db")
trials = [(t.number, t.user_attrs.get("refusals"), t.user_attrs.get("kl_divergence"))
          for t in study.trials]
print(json.dumps({"base": result.base_refusals, "trials": trials}))
"""


def run_checkout(checkout: Path, model: str) -> dict:
    # HERETIC_CONFIRM=false keeps the evaluation sets whole in a checkout that has the held-out
    # confirmation; one without it ignores the variable.
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "HF_HUB_OFFLINE": "1"}
    env["HERETIC_CONFIRM"] = "false"
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run(
            [sys.executable, "-c", _RUN, model, work, str(DATA)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"{checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (the organism)")
    ap.add_argument("--old", type=Path, required=True, help="checkout to compare against")
    ap.add_argument("--new", type=Path, default=ROOT, help="checkout under test (this one)")
    args = ap.parse_args()
    old, new = run_checkout(args.old, args.model), run_checkout(args.new, args.model)
    print(f"base refusals: old {old['base']}, new {new['base']}")
    print("| trial | old refusals | old KL | new refusals | new KL | same |")
    print("| --- | --- | --- | --- | --- | --- |")
    same_all = old["base"] == new["base"] and len(old["trials"]) == len(new["trials"])
    for (n, r_old, kl_old), (_, r_new, kl_new) in zip(old["trials"], new["trials"], strict=False):
        same = (r_old, kl_old) == (r_new, kl_new)
        same_all &= same
        print(
            f"| {n} | {r_old} | {kl_old:.6f} | {r_new} | {kl_new:.6f} | {'yes' if same else 'NO'} |"
        )
    print("identical" if same_all else "DIFFERENT")


if __name__ == "__main__":
    main()
