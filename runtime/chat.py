"""Chat in a terminal with a built model: streaming, multi-turn, /clear and /exit.

    python -m runtime.chat --model dist/<name>.bmodel [--devid 2]      # TPU (or its simulator)
    python -m runtime.chat --model build/<model>/seq<L>/onnx            # onnxruntime (CPU)
    python -m runtime.chat --model <model> --prompt "Hello"             # one answer, then exit
"""
import argparse
import json
import sys
from pathlib import Path

from .chat_format import DEFAULT_SYSTEM, Message, PromptTooLong, fit_history
from .engine import Engine
from .generate import Result, generate
from .sampling import SamplingParams
from .tokenizer import load_tokenizer


def open_backend(model: Path, devid: str = "0"):
    """The backend for what --model points at: a folder of ONNX pieces, or a .bmodel."""
    if model.is_dir() and (model / "model.json").is_file():
        from .onnx_backend import OnnxBackend

        return OnnxBackend(model)
    if model.suffix == ".bmodel" and model.is_file():
        from .bmodel_backend import BmodelBackend
        from .toolchain_process import ToolchainError

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True,
                   help="dist/<name>.bmodel (the TPU-MLIR runtime: a device, or the simulator), or an ONNX "
                        "folder build/<model>/seq<L>/onnx (onnxruntime)")
    p.add_argument("--devid", default="0", help="device id(s) for a bmodel: one, or one per device it was built for (2,3)")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json or qwen.tiktoken "
                   "(default: the one the build put beside the model)")
    p.add_argument("--prompt", help="answer this one message and exit (no interaction)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt ('' for none)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--no-think", action="store_true", help="Qwen3: answer without a thinking block")
    p.add_argument("--chatml", action="store_true", help="use plain ChatML even if the model has a chat template")
    return p.parse_args(argv)


class Chat:
    def __init__(self, args):
        self.args = args
        backend = open_backend(args.model, args.devid)
        self.engine_info = backend.info
        self.backend = backend
        tokenizer_dir = args.tokenizer or default_tokenizer(args.model)
        try:
            self.tokenizer = load_tokenizer(tokenizer_dir)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}; pass --tokenizer <checkpoint folder>") from None
        try:
            self.params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        self.history: list[Message] = []

    def answer(self, query: str, out) -> Result:
        seq = self.engine_info["seq"]
        room = min(self.args.max_new_tokens, seq // 2)  # keep room for the answer
        options = {"enable_thinking": False if self.args.no_think else None, "use_template": not self.args.chatml}
        ids, dropped = fit_history(self.tokenizer, self.args.system or None, self.history, query, seq - room,
                                   **options)
        if dropped:
            print(f"[history: dropped the {dropped} oldest turn(s) to fit seq_length {seq}]", file=out, flush=True)
        result = Result()
        for piece in generate(Engine(self.backend), self.tokenizer, ids, self.args.max_new_tokens, self.params,
                              self.args.stop, result):
            print(piece, end="", file=out, flush=True)
        print(file=out)
        self.history += [Message("user", query), Message("assistant", result.text)]
        return result


def stats(result: Result) -> str:
    return (f"[{len(result.tokens)} tokens, {result.finish_reason}; prompt {result.prompt_tokens} tokens; "
            f"first token {result.first_token_seconds:.2f} s; {result.decode_tokens_per_second:.3g} tokens/s]")


def main(argv=None):
    args = parse_args(argv)
    chat = Chat(args)
    if args.prompt is not None:
        try:
            result = chat.answer(args.prompt, sys.stdout)
        except PromptTooLong as err:
            raise SystemExit(f"error: {err}") from None
        print(stats(result), file=sys.stderr)
        return
    print(f"Chatting with {args.model} (seq_length {chat.engine_info['seq']}). /clear forgets the conversation, "
          "/exit quits.", flush=True)
    while True:
        try:
            query = input("\nUser: ")
        except EOFError:
            print()
            break
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
        except PromptTooLong as err:
            print(f"\n[error: {err}]")
            continue
        print(stats(result), flush=True)


if __name__ == "__main__":
    main()
