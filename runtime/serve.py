"""HTTP API for a built model: OpenAI-compatible chat completions (streaming and not), the model
list, a health check, and the seed's `POST /chat/completions {question, history, stream}`.

    python -m runtime.serve --model dist/<name>.bmodel --port 8000     (or an ONNX folder)

One generation runs at a time per loaded model; others wait in a bounded queue. When the queue
is full the answer is 429 with Retry-After. A client that disconnects stops its generation.
"""
import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .chat import default_tokenizer, open_backend
from .chat_format import DEFAULT_SYSTEM, Message, PromptTooLong, fit_history
from .engine import Engine
from .generate import Result, generate
from .sampling import SamplingParams
from .tokenizer import load_tokenizer


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)


class SeedRequest(BaseModel):
    """The body of the seed's api.py: history alternates user and assistant texts."""
    question: str
    history: list[str] = []
    stream: bool = False


class Busy(Exception):
    pass


class ChatService:
    """One model, one generation at a time, a bounded queue of waiting requests."""

    def __init__(self, model: Path, name: str, tokenizer: Path | None = None, max_queue: int = 4,
                 default_max_tokens: int = 256, devid: str = "0"):
        self.backend = open_backend(model, devid)
        self.tokenizer = load_tokenizer(tokenizer or default_tokenizer(model))
        self.name, self.seq = name, self.backend.info["seq"]
        self.max_queue, self.default_max_tokens = max_queue, default_max_tokens
        self.slot = asyncio.Semaphore(1)
        self.waiting = 0
        self.busy = False
        self.finished = {"stop": 0, "length": 0, "cancelled": 0}  # generations, by how they ended
        self.average_seconds = 5.0  # for Retry-After; updated as generations finish

    def prompt(self, messages: list[Message], max_tokens: int) -> tuple[list[int], int]:
        room = min(max_tokens, self.seq // 2)
        system = next((m.content for m in messages if m.role == "system"), None)
        rest = [m for m in messages if m.role != "system"]
        if not rest or rest[-1].role != "user":
            raise ValueError("messages: the last message must be the user's")
        return fit_history(self.tokenizer, system, rest[:-1], rest[-1].content, self.seq - room)

    def reserve(self) -> None:
        """A place in the queue, taken before anything is awaited (so the bound is exact)."""
        if self.waiting >= self.max_queue:
            raise Busy()
        self.waiting += 1

    async def run(self, ids: list[int], max_tokens: int, params: SamplingParams, stop: list[str], on_piece,
                  cancelled: threading.Event) -> Result:
        """With a place reserved: waits for the model, then generates in a thread; `on_piece` gets text."""
        try:
            await self.slot.acquire()
        finally:
            self.waiting -= 1
        loop, result = asyncio.get_running_loop(), Result()

        def work():
            if cancelled.is_set():  # the client left while waiting in the queue
                result.finish_reason = "cancelled"
                return
            start = time.perf_counter()
            for piece in generate(Engine(self.backend), self.tokenizer, ids, max_tokens, params, stop, result,
                                  cancelled.is_set):
                loop.call_soon_threadsafe(on_piece, piece)
            self.average_seconds = 0.7 * self.average_seconds + 0.3 * (time.perf_counter() - start)

        self.busy = True
        try:
            await asyncio.to_thread(work)
        finally:
            self.busy = False
            self.slot.release()
        self.finished[result.finish_reason] = self.finished.get(result.finish_reason, 0) + 1
        return result


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False) if not isinstance(data, str) else data}\n\n"


def create_app(service: ChatService) -> FastAPI:
    app = FastAPI(title="qwen-tpu", description=__doc__.splitlines()[0])

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, err):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse(status_code=400, content={"error": {"message": problems or "malformed request",
                                                                "type": "invalid_request_error"}})

    def busy_response():
        retry = max(1, round(service.average_seconds * (service.waiting + 1)))
        return JSONResponse(status_code=429, headers={"Retry-After": str(retry)},
                            content={"error": {"message": f"the model is busy and {service.waiting} requests are "
                                               f"waiting; retry in {retry} s", "type": "rate_limit_error"}})

    def too_long(err):
        return JSONResponse(status_code=400, content={"error": {"message": str(err), "type": "invalid_request_error",
                                                                "code": "context_length_exceeded"}})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, "seq_length": service.seq, "busy": service.busy,
                "waiting": service.waiting, "finished": service.finished}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "qwen-tpu"}]}

    async def respond(request: Request, messages: list[Message], max_tokens: int, params: SamplingParams,
                      stop: list[str], stream: bool, stream_chunk, final, done_marker: bool):
        """Shared by both APIs: queueing, disconnects, streaming or not."""
        try:
            ids, _ = service.prompt(messages, max_tokens)
        except PromptTooLong as err:
            return too_long(err)
        except ValueError as err:
            return JSONResponse(status_code=400, content={"error": {"message": str(err),
                                                                    "type": "invalid_request_error"}})
        try:
            service.reserve()
        except Busy:
            return busy_response()
        cancelled, queue = threading.Event(), asyncio.Queue()
        task = asyncio.create_task(service.run(ids, max_tokens, params, stop, queue.put_nowait, cancelled))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        if not stream:
            while not task.done():
                if await request.is_disconnected():
                    cancelled.set()
                await asyncio.wait([task], timeout=0.2)
            return final(task.result())

        async def events():
            try:
                while (piece := await queue.get()) is not None:
                    yield _sse(stream_chunk(piece))
                yield _sse(final(task.result(), streaming=True))
                if done_marker:
                    yield _sse("[DONE]")
            finally:
                cancelled.set()  # the client went away (or we are done): stop generating

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            params = SamplingParams(body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        max_tokens = body.max_completion_tokens or body.max_tokens or service.default_max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": service.name}
        first = [True]

        def chunk(piece):
            delta = {"role": "assistant", "content": piece} if first[0] else {"content": piece}
            first[0] = False
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

        def final(result, streaming=False):
            reason = "length" if result.finish_reason == "length" else "stop"
            if streaming:
                return {**head, "object": "chat.completion.chunk", "usage": _usage(result),
                        "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
            return {**head, "object": "chat.completion", "usage": _usage(result),
                    "choices": [{"index": 0, "finish_reason": reason,
                                 "message": {"role": "assistant", "content": result.text}}]}

        messages = [Message(m.role, m.content) for m in body.messages]
        return await respond(request, messages, max_tokens, params, stop, body.stream, chunk, final, True)

    @app.post("/chat/completions")
    async def seed_chat(body: SeedRequest, request: Request):
        """The seed's API: every event (and the answer) is {"data": the answer so far}."""
        messages = [Message("system", DEFAULT_SYSTEM)]
        for k, text in enumerate(body.history):
            messages.append(Message("user" if k % 2 == 0 else "assistant", text))
        messages.append(Message("user", body.question))
        so_far = [""]

        def chunk(piece):
            so_far[0] += piece
            return {"data": so_far[0]}

        def final(result, streaming=False):
            return {"data": result.text}

        return await respond(request, messages, service.default_max_tokens, SamplingParams(), [], body.stream,
                             chunk, final, False)

    return app


def main(argv=None):
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="dist/<name>.bmodel, or an ONNX folder")
    p.add_argument("--devid", default="0", help="device id(s) for a bmodel: one, or one per device it was built for (2,3)")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--name", help="the model id the API reports (default: from the model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=4, help="requests that may wait for the model")
    p.add_argument("--max-tokens", type=int, default=256, help="default answer length")
    args = p.parse_args(argv)
    service = ChatService(args.model, "", args.tokenizer, args.max_queue, args.max_tokens, args.devid)
    service.name = args.name or service.backend.info.get("model", args.model.name)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
