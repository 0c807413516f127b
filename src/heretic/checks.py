"""Checks across prompt sets that no single loader can make.

`prompts.load_prompts` validates one set at a time (file, column, slice, empty result). Two
mistakes only show when the sets are seen together or against what was asked for:

- a split that asks for more prompts than the source holds (`[:400]` of a 300-line file):
  Python slicing would quietly return fewer, and the user would believe the run used 400;
- evaluation prompts that are also direction prompts: the refusal count and KL divergence
  would then be measured on the prompts the directions were fitted to, which flatters the edit.
  That is a warning, not an error, since some users do it knowingly with small sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from heretic.config import DatasetSpecification
from heretic.errors import DatasetError
from heretic.splits import parse_split

EVALUATION_PAIRS = (
    ("good_evaluation_prompts", "good_prompts"),
    ("bad_evaluation_prompts", "bad_prompts"),
    ("good_evaluation_prompts", "bad_prompts"),
    ("bad_evaluation_prompts", "good_prompts"),
)


def requested_count(split: str) -> int | None:
    """How many prompts an absolute, non-negative slice asks for (`[270:370]` -> 100)."""
    try:
        parsed = parse_split(split)
    except ValueError:
        return None  # load_prompts reports malformed splits
    if parsed.percent or parsed.stop is None or parsed.stop < 0:
        return None
    start = parsed.start or 0
    if start < 0:
        return None
    return max(0, parsed.stop - start)


def check_prompt_count(spec: DatasetSpecification, prompts: Sequence[str], setting: str) -> None:
    """Refuse a set that came out smaller than its split asked for."""
    wanted = requested_count(spec.split)
    if wanted is not None and len(prompts) < wanted:
        raise DatasetError(
            f"{setting}: split {spec.split!r} asks for {wanted} prompts, but {spec.dataset} "
            f"gave only {len(prompts)} there. Add prompts or shrink {setting}.split "
            f"(e.g. set its end so that it covers {len(prompts)} prompts)."
        )


def overlap_warnings(prompts: Mapping[str, Sequence[str]]) -> list[str]:
    """One line per evaluation set that shares prompts with a direction set."""
    lines = []
    for evaluation, directions in EVALUATION_PAIRS:
        if evaluation not in prompts or directions not in prompts:
            continue
        shared = set(prompts[evaluation]) & set(prompts[directions])
        if shared:
            example = next(iter(sorted(shared)))
            lines.append(
                f"{len(shared)} of the {len(prompts[evaluation])} {evaluation} are also "
                f"{directions} (e.g. {example[:60]!r}): scores measured on prompts the "
                "directions were fitted to look better than they are. Use disjoint splits."
            )
    return lines
