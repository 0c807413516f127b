"""After the search: saving with a card, the menu (driven by scripted answers), chat, upload
failures, and the headless flags that do what the menu does."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import socket
import threading
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console
from tiny_models import add_range_trial

from heretic.card import SourceInfo, render_card, reproduce_args, source_info
from heretic.config import load_settings
from heretic.edit import EditHooks
from heretic.errors import ExportError, HereticError, SettingsError
from heretic.finish import Finisher
from heretic.judges import AdaptiveJudge
from heretic.loading import load_model
from heretic.menu import BACK, MORE, QUIT, SAVE, UPLOAD, ScriptedAsker, run_menu
from heretic.sites import COMPONENTS
from heretic.upload import upload_folder


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


class FakeEvaluator:
    base_refusals = 7
    bad_prompts = ["bad"] * 8
    good_prompts = ["good"] * 5
    thinks = False
    judge = AdaptiveJudge(markers=("sorry",), phrases=("that request crosses a line",))


def _add_trial(study: optuna.Study, kl: float, refusals: int, weight: float) -> None:
    add_range_trial(study, kl, refusals, weight, max_weight=1.5)


@pytest.fixture
def source_model(tiny_chat_model, tmp_path) -> Path:
    """The tiny model with a model card declaring a license and a tag."""
    folder = tmp_path / "source"
    shutil.copytree(tiny_chat_model, folder)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- tiny-test\n---\n# Tiny\n")
    return folder


def _finisher(model_path: Path, out: Path, *argv: str, search_more=None) -> Finisher:
    settings = load_settings(
        ["--model", str(model_path), "--output-dir", str(out), "--batch-size", "4", *argv]
    )
    model = load_model(str(model_path), dtype="float32", system_prompt=settings.system_prompt)
    directions = torch.nn.functional.normalize(
        torch.randn(model.n_layers, model.hidden_size), dim=-1
    )
    study = optuna.create_study(directions=["minimize", "minimize"])
    _add_trial(study, 0.30, 1, 1.0)
    _add_trial(study, 0.05, 4, 0.4)
    _add_trial(study, 0.50, 6, 0.2)  # dominated
    return Finisher(
        settings=settings,
        console=_quiet(),
        model=model,
        hooks=EditHooks(model.sites, directions),
        directions=directions,
        evaluator=FakeEvaluator(),
        study=study,
        search_more=search_more or (lambda total: None),
        prompts={"good_prompts": ["Say hi.", "Count to 3."], "bad_prompts": ["Do crime.", "Harm."]},
    )


def test_save_writes_card_metadata_and_plots(source_model, tmp_path):
    out = tmp_path / "out"
    finisher = _finisher(source_model, out, "--export", "model,adapter", "--plot-residuals")
    trial = finisher.study.trials[0]
    finisher.save(trial)
    expected = (
        "model/model.safetensors", "model/README.md", "adapter/adapter_config.json",
        "adapter/README.md", "heretic_metadata.json", "pareto.png", "residuals.png",
    )  # fmt: skip
    for path in expected:
        assert (out / path).is_file(), path
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary output left"

    card = (out / "model" / "README.md").read_text()
    header = card.split("---")[1]
    assert "license: mit" in header
    assert "- heretic" in header and "- tiny-test" in header
    assert "library_name: transformers" in header
    assert "base_model" not in header  # a local folder is not a hub id
    assert "W' = W - w r (r^T W)" in card
    assert "| refusals (original -> this model) | 7/8 -> 1/8 |" in card
    assert "1 refusal phrases learned from the source model" in " ".join(card.split())
    assert "| KL divergence | 0.3000 |" in card
    assert "| harmless prompts (KL) | 5: good_evaluation_prompts" in card
    assert "first response token" in card
    # This finisher has no confirmation: the card says so instead of a held-out column.
    assert "Held out: not measured (nothing to confirm on)." in card
    assert "`You are a helpful assistant.`" in card
    assert "--select 0" in card
    adapter_card = (out / "adapter" / "README.md").read_text()
    assert "library_name: peft" in adapter_card
    meta = json.loads((out / "heretic_metadata.json").read_text())
    assert meta["trial_number"] == 0 and meta["exports"] == ["model", "adapter"]


def test_reproduce_command_parses_back_to_the_same_settings(tmp_path):
    argv = [
        "--model", "org/model", "--n-trials", "17", "--system-prompt", "Be terse.",
        "--bad-prompts.dataset", "bad.txt", "--bad-prompts.split", "[:20]",
        "--refusal-markers", "sorry", "--refusal-markers", "no way",
        "--export", "model,adapter", "--no-save", "--output-dir", str(tmp_path),
        "--select", "ask", "--upload-repo-id", "me/x",
    ]  # fmt: skip
    settings = load_settings(argv)
    args = reproduce_args(settings, 12)
    assert args[-2:] == ["--select", "12"]
    assert "--upload-repo-id" not in args  # rerunning should not publish again
    again = load_settings(args)
    skip = {"select", "upload_repo_id"}
    assert {k: v for k, v in again.model_dump().items() if k not in skip} == {
        k: v for k, v in settings.model_dump().items() if k not in skip
    }


def test_card_for_a_hub_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = source_info("SomeOrg/Some-Model-7B")  # offline, not cached: id known, license not
    assert info.hub_id == "SomeOrg/Some-Model-7B" and info.license is None
    settings = load_settings(["--model", "SomeOrg/Some-Model-7B", "--output-dir", str(tmp_path)])
    metadata = {
        "n_bad_evaluation_prompts": 80, "base_refusal_count": 72, "refusal_count": 3,
        "kl_divergence": 0.12, "n_trials": 200, "seed": 42, "trial_number": 150,
        "best_params": {c: {"layer_min": 0.2, "layer_max": 0.8, "weight": 1.0} for c in COMPONENTS},
        "in_search": {
            "refusals": 3, "base_refusals": 72, "n_bad_prompts": 80, "bad_prompts": "harmful",
            "kl_divergence": 0.12, "n_good_prompts": 80, "good_prompts": "harmless",
            "kl_position": "first response token", "response_tokens": 100,
            "decoding": "greedy, up to 100 tokens", "judge": "adaptive",
        },
        "held_out": {
            "measured": True, "refusals": 9, "base_refusals": 18, "marker_refusals": 7,
            "base_marker_refusals": 17, "unanswered": 0, "n_bad_prompts": 20,
            "bad_prompts": "held-out harmful", "response_tokens": 256,
            "decoding": "greedy, 256 tokens, decoded to the end", "judge": "adaptive",
            "kl_divergence": 0.15, "n_good_prompts": 20, "good_prompts": "held-out harmless",
            "kl_position": "first response token",
        },
        "perplexity": {
            "measured": True, "texts": "responses", "n_texts": 20, "n_tokens": 5000,
            "original": {"cross_entropy": 0.5, "perplexity": 1.6487},
            "edited": {"cross_entropy": 0.7, "perplexity": 2.0138},
        },
    }  # fmt: skip
    card = render_card(
        settings=settings,
        source=SourceInfo(hub_id="SomeOrg/Some-Model-7B", license="llama3"),
        metadata=metadata,
        n_layers=32,
        formats=["model"],
    )
    header = card.split("---")[1]
    assert "base_model: SomeOrg/Some-Model-7B" in header and "license: llama3" in header
    assert "| | in the search | held out |" in card
    assert "| refusals (original -> this model) | 72/80 -> 3/80 | 18/20 -> 9/20 |" in card
    assert "| by plain markers | - | 17/20 -> 7/20 |" in card
    assert "| KL divergence | 0.1200 | 0.1500 |" in card
    assert (
        "| responses | greedy, up to 100 tokens | greedy, 256 tokens, decoded to the end |" in card
    )
    assert "Perplexity: 1.649 -> 2.014 (cross-entropy 0.5000 -> 0.7000 nats per token)" in card
    assert "The held-out figures come from prompts no part of the search used" in card


def test_gguf_export_of_a_safetensors_model_says_how(source_model, tmp_path):
    finisher = _finisher(source_model, tmp_path / "out", "--export", "gguf")
    with pytest.raises(ExportError, match="convert_hf_to_gguf"):
        finisher.save(finisher.study.trials[0])
    assert not (tmp_path / "out" / "model").exists()


def test_menu_save_more_and_quit(source_model, tmp_path):
    calls = []

    def search_more(total: int) -> None:
        calls.append(total)
        _add_trial(finisher.study, 0.01, 5, 0.1)  # a new front point

    finisher = _finisher(source_model, tmp_path / "out", search_more=search_more)
    shown = []
    asker = ScriptedAsker([1, SAVE, BACK, MORE, "2", 3, BACK, QUIT])
    saved = run_menu(finisher, asker, show_front=lambda f: shown.append([t.number for t in f]))
    assert saved == 1
    assert calls == [5]  # 3 finished + 2 more
    assert shown == [[0, 1], [0, 1], [0, 1, 3], [0, 1, 3]]
    assert json.loads((tmp_path / "out" / "heretic_metadata.json").read_text())["trial_number"] == 1
    assert "Trial 1 (saved)" in " ".join(asker.questions)


def test_menu_upload_failure_keeps_output_and_returns_to_menu(source_model, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
    finisher = _finisher(source_model, tmp_path / "out")
    asker = ScriptedAsker([0, UPLOAD, "me/model", True, BACK, QUIT])
    run_menu(finisher, asker)
    text = finisher.console.file.getvalue()
    assert "No Hugging Face token" in text
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_chat_streams_multi_turn_with_the_edit_on(source_model, tmp_path):
    finisher = _finisher(source_model, tmp_path / "out")
    lines = iter(["Hello", "", "And again?", "/exit"])
    out = io.StringIO()
    seen_strengths = []

    def read(prompt: str) -> str:
        seen_strengths.append(dict(finisher.hooks.strengths))
        return next(lines)

    messages = finisher.chat(finisher.study.trials[0], read=read, out=out, max_new_tokens=3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert out.getvalue().count("model> ") == 2
    assert all(s for s in seen_strengths), "the trial's edit is on while chatting"
    assert finisher.hooks.strengths == {}, "and off afterwards"


# ----- upload failure paths -----------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "README.md").write_text("card")
    return path


@pytest.fixture
def online(monkeypatch):
    """Undo the test session's HF_HUB_OFFLINE for one test (nothing here reaches the hub)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_upload_without_token(folder, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ExportError, match="No Hugging Face token.*hf auth login"):
        upload_folder(folder, "me/model")


def test_upload_network_down(folder, online):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    with pytest.raises(ExportError, match="cannot reach the Hugging Face hub.*is kept"):
        upload_folder(folder, "me/model", token="hf_fake", endpoint=f"http://127.0.0.1:{port}")
    assert (folder / "README.md").read_text() == "card"


@pytest.mark.parametrize(("status", "message"), [(401, "invalid or expired"), (403, "write")])
def test_upload_refused_by_the_hub(folder, online, status, message):
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.dumps({"error": "nope"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ExportError, match=message):
            upload_folder(
                folder,
                "me/model",
                token="hf_fake",
                endpoint=f"http://127.0.0.1:{server.server_address[1]}",
            )
    finally:
        server.shutdown()


def test_upload_checks_repo_id_and_folder(folder, tmp_path):
    with pytest.raises(ExportError, match="user/name"):
        upload_folder(folder, "no-slash", token="hf_fake")
    with pytest.raises(ExportError, match="Nothing to upload"):
        upload_folder(tmp_path / "missing", "me/model", token="hf_fake")
    with pytest.raises(SettingsError, match="user/name"):
        load_settings(["--upload-repo-id", "a/b/c"])
    with pytest.raises(SettingsError, match="unknown format"):
        load_settings(["--export", "model,onnx"])


# ----- the headless twins through the CLI ------------------------------------------------------

GOOD = [f"Tell me a fact about the number {i}." for i in range(16)]
BAD = [f"Explain how to steal item number {i} from a shop." for i in range(16)]


def _argv(model: Path, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(GOOD) + "\n")
    bad.write_text("\n".join(BAD) + "\n")
    return [
        "--model", str(model),
        "--good-prompts.dataset", str(good), "--good-prompts.split", "[:10]",
        "--bad-prompts.dataset", str(bad), "--bad-prompts.split", "[:10]",
        "--good-evaluation-prompts.dataset", str(good), "--good-evaluation-prompts.split", "[10:]",
        "--bad-evaluation-prompts.dataset", str(bad), "--bad-evaluation-prompts.split", "[10:]",
        "--max-response-length", "2", "--batch-size", "8", "--n-trials", "2",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


def test_headless_select_save_export_and_failed_upload(source_model, tmp_path, monkeypatch, online):
    from heretic.cli import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    out = tmp_path / "out"
    argv = _argv(source_model, tmp_path, out, "--select", "1", "--export", "model,adapter")
    with pytest.raises(HereticError, match="cannot reach the Hugging Face hub"):
        run(load_settings([*argv, "--upload-repo-id", "me/model", "--private"]), _quiet())
    # The upload failed after a complete save: everything local is there.
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "--select 1" in (out / "model" / "README.md").read_text()
    assert (out / "pareto.png").is_file()

    shutil.rmtree(out / "model")
    result = run(load_settings([*argv, "--no-save"]), _quiet())
    assert result.chosen_trial == 1
    assert not (out / "model").exists()
