"""Agents written against the OpenAI chat API, trained unchanged: an OpenAI-compatible endpoint
that records token-exact trajectories.

``rollout.agent.program: my_pkg.agent:solve`` names a function ``solve(base_url, trajectory,
row) -> float`` that talks to ``{base_url}/chat/completions`` as to any OpenAI-compatible
server (the ``openai`` client, plain HTTP), passes ``user=trajectory`` in each request, and
returns the trajectory's reward::

    def solve(base_url, trajectory, row):
        client = openai.OpenAI(base_url=base_url, api_key="none")
        messages = [{"role": "user", "content": row["prompt"]}]
        reply = client.chat.completions.create(model="policy", messages=messages,
                                               user=trajectory)
        ...   # call tools, append their results, ask again, grade
        return 1.0 if correct else 0.0

The server (on 127.0.0.1, one per rollout) turns each request into a turn of the trajectory:
the first request's messages are the prompt (tokenized with the chat template); every later
request must repeat the conversation so far unchanged (the earlier messages and the assistant
replies exactly as returned) and may append non-assistant messages, which become observation
tokens (:mod:`megarlhf.data.conversation`: never re-tokenized). The reply's tokens are exactly
what the engine generated, with the job's sampling (a request's ``temperature`` / ``top_p`` are
ignored: training samples from the policy it trains; ``max_tokens`` may lower a turn's budget).
Requests from all trajectories are batched into engine calls (those waiting at the moment).

A request that rewrites the conversation, exceeds the trajectory's budget, or names an unknown
trajectory is answered with an HTTP error (400) and the trajectory ends as a fault; a program
that raises or runs past ``rollout.agent.step_timeout_s`` per request also ends its trajectory
with ``fault_reward`` (counted in ``agent/env_*``), never the run.
"""

from __future__ import annotations

import importlib
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

from megarlhf.agents.env import EnvError
from megarlhf.agents.rollout import AgentSettings, _metrics, turn_params
from megarlhf.agents.trajectory import TemplateError, TokenAssembler, Trajectory
from megarlhf.rollout.base import RolloutOutput, SamplingParams


class RequestError(ValueError):
    """A request the trajectory cannot take (HTTP 400); the trajectory ends as a fault."""


def program_function(spec: str) -> Callable[..., Any]:
    """The agent program ``module:function``.

    Raises:
        EnvError: not importable or not callable.
    """
    mod, sep, name = spec.partition(":")
    if not sep:
        raise EnvError(f"rollout.agent.program = {spec!r}: give module:function")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"rollout.agent.program = {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise EnvError(f"rollout.agent.program = {spec!r} is not callable")
    return fn


class _Batcher:
    """Collects the turns waiting for the model and sends them to the engine together (one
    call per turn budget), in a thread of its own."""

    def __init__(self, generate, params: SamplingParams, window_s: float = 0.01):
        self.generate, self.params, self.window_s = generate, params, window_s
        self.q: queue.Queue = queue.Queue()
        self.calls = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="megarlhf-batcher")
        self.thread.start()

    def submit(self, context: list[int], max_new: int) -> Future:
        f: Future = Future()
        self.q.put((context, max_new, f))
        return f

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            items = [first]
            end = time.monotonic() + self.window_s
            while time.monotonic() < end:
                try:
                    items.append(self.q.get(timeout=max(0.0, end - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[int, list] = {}
            for it in items:
                groups.setdefault(it[1], []).append(it)
            for max_new, group in groups.items():
                p = turn_params(self.params, max_new, self.calls)
                self.calls += 1
                try:
                    outs = self.generate([c for c, _, _ in group], p)
                except BaseException as e:  # noqa: BLE001 - handed to every waiting request
                    for _, _, f in group:
                        f.set_exception(e)
                    continue
                for (_, _, f), out in zip(group, outs, strict=True):
                    f.set_result(out.samples[0])

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    # Every trajectory of a rollout batch may connect at once (hundreds): the default listen
    # backlog of 5 refused connections under that load.
    request_queue_size = 4096


class TrajectoryServer:
    """The OpenAI-compatible endpoint of one rollout (module docstring); a context manager."""

    def __init__(self, generate: Callable[[list[list[int]], SamplingParams],
                                          list[RolloutOutput]],
                 assembler: TokenAssembler, params: SamplingParams, settings: AgentSettings,
                 tools: Sequence[dict] | None = None):
        self.assembler, self.settings = assembler, settings
        self.batcher = _Batcher(generate, params)
        self.trajectories: dict[str, Trajectory] = {}
        self.errors: dict[str, str] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # requests are counted, not printed
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    n = int(self.headers.get("Content-Length", "0"))
                    body = json.loads(self.rfile.read(n) or b"{}")
                    self._send(200, server.complete(body))
                except RequestError as e:
                    self._send(400, {"error": {"message": str(e), "type": "invalid_request"}})

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="megarlhf-openai-server")
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def open(self, tid: str) -> None:
        with self.lock:
            self.trajectories[tid] = None  # type: ignore[assignment]

    def _fail(self, tid: str, why: str) -> RequestError:
        with self.lock:
            self.errors.setdefault(tid, why)
        return RequestError(why)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        tid = body.get("user")
        if tid not in self.trajectories:
            raise RequestError(f"unknown trajectory {tid!r}: pass the trajectory id the "
                               "program was given as the request's `user`")
        if tid in self.errors:
            raise RequestError(f"trajectory {tid} already ended: {self.errors[tid]}")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool")
                and isinstance(m.get("content"), str) for m in messages):
            raise self._fail(tid, "messages must be a non-empty list of {role, content} with "
                                  "string content")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        t = self.trajectories[tid]
        s = self.settings
        if t is None:
            if msgs[-1]["role"] == "assistant":
                raise self._fail(tid, "the first request must end with a non-assistant message")
            try:
                ids = self.assembler.encode_prompt(msgs)
            except TemplateError as e:
                raise self._fail(tid, str(e)) from None
            if s.max_prompt_tokens is not None and len(ids) > s.max_prompt_tokens:
                raise self._fail(tid, f"the prompt is {len(ids)} tokens, over "
                                      f"data.max_prompt_len = {s.max_prompt_tokens}")
            t = Trajectory(prompt_ids=ids, messages=msgs, extended_prompt=True)
            with self.lock:
                self.trajectories[tid] = t
        else:
            k = len(t.messages)
            if msgs[:k] != t.messages:
                raise self._fail(tid, "the request changed the conversation so far (earlier "
                                      "messages and the assistant's replies must be sent back "
                                      "unchanged: the trajectory is token-exact)")
            new = msgs[k:]
            if not new or any(m["role"] == "assistant" for m in new):
                raise self._fail(tid, "a follow-up request appends only non-assistant "
                                      "messages (tool results, user turns)")
            if t.turns >= s.max_turns:
                raise self._fail(tid, f"max_turns = {s.max_turns} reached")
            try:
                obs = self.assembler.observation_ids(t, new)
            except TemplateError as e:
                raise self._fail(tid, str(e)) from None
            if len(t.ids) + len(obs) >= s.max_tokens:
                raise self._fail(tid, f"the trajectory reached max_tokens = {s.max_tokens}")
            self.assembler.add_observations(t, new, obs)
        room = min(s.max_tokens_per_turn, s.max_tokens - len(t.ids))
        asked = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(asked, int) and asked > 0:
            room = min(room, asked)
        sample = self.batcher.submit(t.context, room).result()
        text = self.assembler.add_turn(t, list(sample.token_ids),
                                       None if sample.logprobs is None else list(sample.logprobs))
        n_prompt = len(t.context) - len(sample.token_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion",
                "created": int(time.time()), "model": str(body.get("model", "policy")),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": sample.finish_reason}],
                "usage": {"prompt_tokens": n_prompt,
                          "completion_tokens": len(sample.token_ids),
                          "total_tokens": n_prompt + len(sample.token_ids)}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()

    def __enter__(self) -> "TrajectoryServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_program_rollouts(generate, starts: Sequence[tuple[list[int], list[dict], dict]],
                         program: Callable[..., Any], assembler: TokenAssembler,
                         params: SamplingParams, settings: AgentSettings,
                         tools: Sequence[dict] | None = None
                         ) -> tuple[list[Trajectory], dict[str, float]]:
    """One run of ``program(base_url, trajectory_id, row)`` per entry of ``starts`` (threads),
    against a :class:`TrajectoryServer`; returns the trajectories it drove (in order) and the
    batch's metrics. A program's return value is its trajectory's reward."""
    counts = {"env_errors": 0, "env_timeouts": 0, "env_garbage": 0}
    with TrajectoryServer(generate, assembler, params, settings, tools) as server:
        ids = [f"t{k}-{uuid.uuid4().hex[:8]}" for k in range(len(starts))]
        results: list[list] = [[] for _ in starts]
        threads = []
        for k, (tid, (_, _, row)) in enumerate(zip(ids, starts)):
            server.open(tid)

            def work(tid=tid, row=row, out=results[k]):
                t0 = time.monotonic()
                try:
                    out.append(("ok", program(server.base_url, tid, dict(row)),
                                time.monotonic() - t0))
                except BaseException as e:  # noqa: BLE001 - this trajectory's fault, counted
                    out.append(("error", e, time.monotonic() - t0))

            th = threading.Thread(target=work, daemon=True, name=f"megarlhf-agent-{k}")
            th.start()
            threads.append(th)
        limit = settings.step_timeout_s * (settings.max_turns + 1)
        deadline = time.monotonic() + limit
        for th in threads:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        trajs = []
        for k, (tid, (pids, msgs, _)) in enumerate(zip(ids, starts)):
            t = server.trajectories.get(tid) or Trajectory(prompt_ids=list(pids),
                                                           messages=list(msgs))
            res = results[k]
            fault = None
            if not res:
                fault, kind = f"the program did not finish within {limit:g} s", "env_timeouts"
            elif res[0][0] == "error":
                fault, kind = repr(res[0][1])[:500], "env_errors"
            elif tid in server.errors:
                fault, kind = server.errors[tid], "env_errors"
            else:
                try:
                    t.reward = float(res[0][1])
                    if t.reward != t.reward or abs(t.reward) == float("inf"):
                        raise ValueError
                except (TypeError, ValueError):
                    fault, kind = f"the program returned {res[0][1]!r}, not a number", \
                        "env_garbage"
            if res:
                t.env_seconds = res[0][2]
            if fault is None:
                t.finish = "done"
            else:
                counts[kind] += 1
                t.finish = {"env_timeouts": "env_timeout", "env_garbage": "env_garbage"}.get(
                    kind, "env_error")
                t.reward = settings.fault_reward
                t.info = {"fault": fault}
            trajs.append(t)
    return trajs, _metrics(trajs, counts)
