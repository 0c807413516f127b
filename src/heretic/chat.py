"""Chat with the edited model before saving it: streamed, multi-turn, greedy.

Refusal counts and KL divergence are proxies; a few turns of conversation show whether a
trial still writes coherent text and really answers. The caller switches the trial's edit on
(forward hooks, so nothing is merged or copied) before calling `chat_loop`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TextIO

import torch

EXIT_COMMANDS = ("/exit", "/quit", "/back")
RESET_COMMAND = "/reset"


def stream_reply(
    model,
    messages: list[dict[str, str]],
    max_new_tokens: int,
    out: TextIO,
) -> str:
    """Generate the assistant's next turn, writing tokens to `out` as they come; returns it.

    `model` is a heretic `Model` (its chat template, thinking switch and response prefix
    format the conversation, as in the search).
    Generation runs in a worker thread feeding a `TextIteratorStreamer`, the way transformers
    streams; the text is printed from this thread.
    """
    from transformers import TextIteratorStreamer

    tokenizer = model.tokenizer
    text = model.format_messages(messages)
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.inference_mode():
                model.greedy(max_new_tokens, **batch, streamer=streamer)
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    worker.join()
    out.write("\n")
    out.flush()
    if errors:
        raise errors[0]
    return "".join(pieces)


def chat_loop(
    model,
    *,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    max_new_tokens: int = 512,
) -> list[dict[str, str]]:
    """Multi-turn chat until /exit (or Ctrl-D / Ctrl-C); returns the conversation.

    `/reset` starts a new conversation. The system prompt is the run's, so the chat shows the
    model as it was evaluated.
    """
    out = out or sys.stdout
    system = [{"role": "system", "content": model.system_prompt}] if model.system_prompt else []
    messages = list(system)
    out.write(
        f"Chat with the edited model: {' or '.join(EXIT_COMMANDS[:2])} (or Ctrl-D) to go back, "
        f"{RESET_COMMAND} to start over.\n"
    )
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_COMMANDS:
            break
        if text.lower() == RESET_COMMAND:
            messages = list(system)
            out.write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": text})
        out.write("model> ")
        try:
            reply = stream_reply(model, messages, max_new_tokens, out)
        except KeyboardInterrupt:
            out.write("\n(interrupted)\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
    return messages
