"""Chat in a terminal with a built model: streaming, multi-turn, /clear and /exit.

    python -m runtime.chat --model dist/<name>.bmodel [--devid 2]      # TPU (or its simulator)
    python -m runtime.chat --model build/<model>/seq<L>/onnx            # onnxruntime (CPU)
    python -m runtime.chat --model <model> --prompt "Hello"             # one answer, then exit

Ctrl-C during an answer stops it (back to the prompt); at the prompt it ends the session.
"""
import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from .chat_format import DEFAULT_SYSTEM, Message, PromptTooLong, fit_history
from .engine import Engine
from .generate import Result, generate
from .sampling import SamplingParams, sampling_problem
from .tokenizer import load_tokenizer
from .traffic import per_token_line

SURROGATES = re.compile("[\ud800-\udfff]")


def open_backend(model: Path, devid: str = "0", chunk: int | None = None):
    """The backend for what --model points at: a folder of ONNX pieces (with the history prefill
    pieces of `chunk` tokens, default the largest exported; 0: none), or a .bmodel."""
    if model.is_dir() and (model / "model.json").is_file():
        from .onnx_backend import OnnxBackend

        try:
            return OnnxBackend(model, chunk=chunk)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}") from None
    if model.suffix == ".bmodel" and model.is_file():
        from .bmodel_backend import BmodelBackend
        from .toolchain import ToolchainError

        try:
            ids = [int(d) for d in str(devid).split(",")]
        except ValueError:
            raise SystemExit(f"error: --devid {devid}: give device ids as numbers, e.g. --devid 0 or --devid 2,3") from None
        try:
            return BmodelBackend(model, ids)
        except ToolchainError as err:
            raise SystemExit(f"error: {err}") from None
    raise SystemExit(f"error: {model} is neither a folder of exported pieces (with model.json) nor a .bmodel file")


def default_tokenizer(model: Path) -> Path:
    """An ONNX folder carries its tokenizer; a bmodel's description names the folder beside it."""
    description = model.with_suffix(".json")
    if model.suffix == ".bmodel" and description.is_file():
        name = json.loads(description.read_text(encoding="utf-8")).get("tokenizer")
        if name:
            return model.parent / name
    return model


def at_least(least: int):
    """An argparse type: an integer, `least` or more."""
    def integer(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least} (got {value})")
        return value

    return integer


def sampling_option(name: str, convert):
    """An argparse type for a sampling field: converted, then checked by SamplingParams' rule."""
    def parse(text: str):
        value = convert(text)
        problem = sampling_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = convert.__name__  # argparse's "invalid float value: 'x'"
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True,
                   help="dist/<name>.bmodel (the TPU-MLIR runtime: a device, or the simulator), or an ONNX "
                        "folder build/<model>/seq<L>/onnx (onnxruntime)")
    p.add_argument("--devid", default="0", help="device id(s) for a bmodel: one, or one per device it was built for (2,3)")
    p.add_argument("--chunk", type=at_least(0), help="an ONNX folder: use the history prefill pieces of this many "
                   "tokens a run (exported with history=1 chunk=N; default the largest there; 0: none, each turn "
                   "prefilled whole)")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json or qwen.tiktoken "
                   "(default: the one the build put beside the model)")
    p.add_argument("--prompt", help="answer this one message and exit (no interaction)")
    p.add_argument("--system", help=f"system prompt ('' for none). Without it: {DEFAULT_SYSTEM!r}, left out "
                   "when it does not fit with the message; a given one is kept (a message it leaves no room "
                   "for is refused)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256)
    p.add_argument("--temperature", type=sampling_option("temperature", float), default=0.0,
                   help="0 = greedy (at most 2)")
    p.add_argument("--top-k", type=sampling_option("top_k", int), default=0)
    p.add_argument("--top-p", type=sampling_option("top_p", float), default=1.0)
    p.add_argument("--repetition-penalty", type=sampling_option("repetition_penalty", float), default=1.0)
    p.add_argument("--seed", type=sampling_option("seed", int), help="any 64-bit integer")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--no-think", action="store_true", help="Qwen3: answer without a thinking block")
    p.add_argument("--chatml", action="store_true", help="use plain ChatML even if the model has a chat template")
    return p.parse_args(argv)


def clean_text(text: str) -> tuple[str, int]:
    """Undecodable input bytes (read as lone surrogates) become U+FFFD; returns the text and how many."""
    return SURROGATES.subn("\ufffd", text)


@contextlib.contextmanager
def interrupt_sets(event: threading.Event):
    """While inside, Ctrl-C sets `event` (generation stops at the next token) instead of raising."""
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Chat:
    def __init__(self, args):
        self.args = args
        backend = open_backend(args.model, args.devid, args.chunk)
        self.engine_info = backend.info
        self.backend, self.engine = backend, Engine(backend)  # one engine: the device state is made once
        tokenizer_dir = args.tokenizer or default_tokenizer(args.model)
        try:
            self.tokenizer = load_tokenizer(tokenizer_dir)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}; pass --tokenizer <checkpoint folder>") from None
        self.params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
        self.history: list[Message] = []
        self.said_system_dropped = False
        self.said_no_history = False

    def prompt(self, query: str, notes) -> list[int]:
        """The prompt ids; the history keeps only what fitted (so the past is not tokenized again
        turn after turn). Says on `notes` what was left out."""
        seq, system = self.engine_info.seq, self.args.system
        prompt = fit_history(self.tokenizer, DEFAULT_SYSTEM if system is None else system or None, self.history,
                             query, seq, self.args.max_new_tokens, optional_system=system is None,
                             enable_thinking=False if self.args.no_think else None, use_template=not self.args.chatml)
        self.history = prompt.history
        if prompt.system_dropped and not self.said_system_dropped:
            self.said_system_dropped = True
            print(f"[the default system prompt does not fit with your messages in seq_length {seq}: left out; "
                  "--system sets one]", file=notes, flush=True)
        if prompt.dropped:
            print(f"[history: dropped the {prompt.dropped} oldest turn(s) to fit seq_length {seq}]", file=notes,
                  flush=True)
        return prompt.ids

    def answer(self, query: str, out, notes=None) -> Result:
        """Streams the answer to `out` (notes to `notes`, default `out`). Ctrl-C stops it:
        finish_reason "cancelled", and the turn is not kept."""
        ids, result, stop = self.prompt(query, notes or out), Result(), threading.Event()
        with interrupt_sets(stop):
            for piece in generate(self.engine, self.tokenizer, ids, self.args.max_new_tokens,
                                  self.params, self.args.stop, result, stop.is_set):
                print(piece, end="", file=out, flush=True)
        print(file=out)
        if self.engine.missed and not self.said_no_history:
            self.said_no_history = True
            print("[this model has no history prefill nets (build it with history=1): each turn prefills the whole "
                  "conversation again]", file=notes or out, flush=True)
        if result.finish_reason != "cancelled":
            self.history += [Message("user", query), Message("assistant", result.text)]
        return result


def stats(result: Result) -> str:
    device = ""  # what crossed between host and device per generated token (a bmodel only)
    if result.decode_steps and result.decode_traffic.launches:
        device = "; " + per_token_line(result.decode_traffic, result.decode_steps)
    prefilled = result.prompt_tokens - result.cached_tokens  # the rest was in the cache from the last turn
    return (f"[{len(result.tokens)} tokens, {result.finish_reason}; prefilled {prefilled} of {result.prompt_tokens} "
            "prompt tokens; "
            f"first token {result.first_token_seconds:.2f} s; {result.decode_tokens_per_second:.3g} tokens/s{device}]")


def read_query() -> str | None:
    """The next line typed, or None at the end of input or on Ctrl-C (the session ends)."""
    try:
        line = input("\nUser: ")
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    line, replaced = clean_text(line)
    if replaced:
        print(f"[input: {replaced} byte(s) that are not {sys.stdin.encoding} replaced by \ufffd]")
    return line


def interact(chat: Chat, args) -> None:
    print(f"Chatting with {args.model} (seq_length {chat.engine_info.seq}). /clear forgets the conversation, "
          "/exit quits; Ctrl-C stops an answer, or quits at the prompt.", flush=True)
    while (query := read_query()) is not None:
        if query.strip() == "/exit":
            break
        if query.strip() == "/clear":
            chat.history.clear()
            print("[conversation cleared]")
            continue
        if not query.strip():
            continue
        print("Assistant: ", end="", flush=True)
        try:
            result = chat.answer(query, sys.stdout)
        except (PromptTooLong, ValueError) as err:  # ValueError: the model's chat template refused
            print(f"\n[error: {err}]")
            continue
        print(stats(result), flush=True)


def clean_option(args, name: str) -> None:
    """Bytes in --prompt or --system that are not in the filesystem encoding arrive as lone
    surrogates too: replaced, and said."""
    if getattr(args, name):
        text, replaced = clean_text(getattr(args, name))
        if replaced:
            print(f"[--{name}: {replaced} byte(s) that are not {sys.getfilesystemencoding()} replaced by \ufffd]",
                  file=sys.stderr)
        setattr(args, name, text)


def one_answer(chat: Chat, text: str) -> None:
    try:
        result = chat.answer(text, sys.stdout, sys.stderr)
    except (PromptTooLong, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(stats(result), file=sys.stderr)
    if result.finish_reason == "cancelled":
        raise SystemExit(130)


def main(argv=None):
    # Undecodable input bytes arrive as lone surrogates (cleaned, and said, by clean_text); text the
    # terminal's encoding cannot show is printed as "?" rather than ending the session.
    sys.stdin.reconfigure(errors="surrogateescape")
    sys.stdout.reconfigure(errors="replace")
    args = parse_args(argv)
    clean_option(args, "prompt")
    clean_option(args, "system")
    try:
        chat = Chat(args)
        if args.prompt is None:
            interact(chat, args)
        else:
            one_answer(chat, args.prompt)
    except KeyboardInterrupt:  # while the model loads
        print(file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader went away (| head): stop quietly, and so does the exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
