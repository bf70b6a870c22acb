"""Run an API-format ComfyUI workflow on a running ComfyUI server, headless (standard library only).

    python -m fastlora_core.headless --server 127.0.0.1:8188 workflows/api/flux_lora_basic.json \\
        --set 2.lora_name=my_style.safetensors --set 3.seed=7 --out results/

``--set NODE_ID.INPUT=VALUE`` (repeatable) overrides any input; VALUE is read as JSON when it parses
(numbers, true/false, ``["1", 0]`` links) and as a plain string otherwise (quote it, ``'"42"'``, to force
a string). Progress comes from ComfyUI's websocket (falling back to polling ``/history``); the images are
downloaded through ``/view`` into ``--out``. Exit status: 0 done, 1 ComfyUI reported an execution error or
the run was interrupted, 2 the workflow was refused (ComfyUI's validation message and node_errors are
printed) or the arguments are wrong, 3 the server could not be reached or the run timed out.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3


class HeadlessError(Exception):
    """A run that did not produce images; ``exit_code`` says which kind of failure."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, details: Any = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.details = details


@dataclass
class RunResult:
    prompt_id: str
    images: list[Path]
    history: dict[str, Any]
    cached: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


# -- workflow and overrides -------------------------------------------------------------------------
def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        graph = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HeadlessError(f"cannot read workflow {path}: {exc}", EXIT_REFUSED) from exc
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise HeadlessError(
            f"{path} is a UI-format workflow (what the canvas saves). The HTTP API needs API format: use "
            "the twin in workflows/api/, or in ComfyUI enable dev mode and use 'Export (API)'.", EXIT_REFUSED)
    if isinstance(graph, dict) and "prompt" in graph and isinstance(graph["prompt"], dict):
        graph = graph["prompt"]
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise HeadlessError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}}).", EXIT_REFUSED)
    return graph


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(graph: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """A copy of ``graph`` with ``NODE_ID.INPUT=VALUE`` overrides applied."""
    graph = json.loads(json.dumps(graph))
    for item in sets:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not node_id or not name:
            raise HeadlessError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. 3.lora_name=x.safetensors",
                                EXIT_REFUSED)
        if node_id not in graph:
            ids = ", ".join(f"{k} ({v['class_type']})" for k, v in graph.items())
            raise HeadlessError(f"--set {item!r}: no node {node_id!r} in the workflow; nodes: {ids}", EXIT_REFUSED)
        inputs = graph[node_id].setdefault("inputs", {})
        if name not in inputs:
            logger.warning("--set %s: node %s (%s) had no input %r; adding it", item, node_id,
                           graph[node_id]["class_type"], name)
        inputs[name] = parse_value(raw)
    return graph


#: ComfyUI's own model-loading nodes: the tiny model written by ``write-tiny --comfy`` is not for them.
COMFY_MODEL_LOADERS = frozenset({"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader", "UNETLoader",
                                 "CheckpointLoaderSimple"})


def tiny_overrides(graph: dict[str, Any], compile: str = "off") -> list[str]:
    """``--set`` overrides (``--tiny``) that point any FastLoRA workflow at the tiny model written by
    ``python -m fastlora_core write-tiny ComfyUI/models --comfy``: the loader keeps its ``source``
    and gets the tiny diffusers folder and the tiny single files, CPU-friendly options (no
    quantisation, ``compile``, float32); LoRA nodes get the tiny LoRAs in turn; Generate gets a
    size and step count that finish in seconds on a CPU.

    Graphs that load text encoders or a VAE with ComfyUI's own nodes (the MODEL-path workflows) are
    refused (``HeadlessError``, exit 2): ComfyUI builds CLIP-L and T5-XXL at their full sizes, so
    the tiny text encoders cannot stand in, and a run would fail later with a less clear error."""
    from .tiny_names import TINY_DIFFUSERS_NAME, TINY_LORA_NAMES, TINY_SINGLE_FILES, TINY_SIZE, TINY_STEPS

    native = sorted({f"{n.get('class_type')} (node {nid})" for nid, n in graph.items()
                     if n.get("class_type") in COMFY_MODEL_LOADERS})
    if native:
        raise HeadlessError(
            f"--tiny cannot run this workflow: it loads models with ComfyUI's own nodes ({', '.join(native)}), "
            "which cannot load the tiny Flux (ComfyUI builds CLIP-L and T5-XXL at full size). Run it with "
            "your real clip_l, t5xxl and ae files (without --tiny), or smoke-test FastLoRA's own workflows "
            "(flux_lora_*, flux_24gb_consumer, flux_pad_dummy_lora).", EXIT_REFUSED)
    sets: list[str] = []
    lora_i = 0
    for nid, node in sorted(graph.items(), key=lambda kv: (len(kv[0]), kv[0])):
        kind = node.get("class_type")
        if kind == "OptimizedFluxLoader":
            sets.append(f"{nid}.diffusers_model={TINY_DIFFUSERS_NAME}")
            sets += [f"{nid}.{name}={file}" for name, (_folder, file) in TINY_SINGLE_FILES.items()]
            sets += [f"{nid}.quantization=none", f"{nid}.t5_quantization=none", f"{nid}.compile={compile}",
                     f"{nid}.offload=none", f"{nid}.dtype=float32"]
        elif kind == "LoraHotswap":
            sets.append(f"{nid}.lora_name={TINY_LORA_NAMES[lora_i % len(TINY_LORA_NAMES)]}.safetensors")
            lora_i += 1
        elif kind == "PadDummyLora":
            sets += [f"{nid}.lora_{i + 1}={name}.safetensors" for i, name in enumerate(TINY_LORA_NAMES[:3])]
        elif kind == "Generate":
            sets += [f"{nid}.steps={TINY_STEPS}", f"{nid}.width={TINY_SIZE}", f"{nid}.height={TINY_SIZE}"]
    return sets


# -- HTTP ---------------------------------------------------------------------------------------------
class Client:
    def __init__(self, server: str, timeout: float = 30.0) -> None:
        if "://" not in server:
            server = "http://" + server
        parsed = urllib.parse.urlparse(server)
        self.base = f"{parsed.scheme}://{parsed.netloc}"
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
            except json.JSONDecodeError:
                payload = raw.decode(errors="replace")
            raise HeadlessError(f"{method} {path}: HTTP {exc.code}", EXIT_REFUSED, payload) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise HeadlessError(f"cannot reach ComfyUI at {self.base}: {exc}. Is it running (python main.py "
                                "--listen ... --port ...)?", EXIT_UNREACHABLE) from exc
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def get_bytes(self, path: str) -> bytes:
        try:
            with urllib.request.urlopen(self.base + path, timeout=self.timeout) as resp:
                return bytes(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            raise HeadlessError(f"GET {path}: {exc}", EXIT_UNREACHABLE) from exc

    def submit(self, graph: dict[str, Any], client_id: str) -> str:
        try:
            answer = self.request("POST", "/prompt", {"prompt": graph, "client_id": client_id})
        except HeadlessError as exc:
            if isinstance(exc.details, dict):
                raise HeadlessError(format_refusal(exc.details), EXIT_REFUSED, exc.details) from exc
            raise
        if answer.get("node_errors"):
            raise HeadlessError(format_refusal(answer), EXIT_REFUSED, answer)
        return str(answer["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        answer = self.request("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        return answer.get(prompt_id) if isinstance(answer, dict) else None


def format_refusal(payload: dict[str, Any]) -> str:
    """ComfyUI's /prompt validation answer (``error`` + ``node_errors``) as readable lines."""
    lines = []
    error = payload.get("error")
    if isinstance(error, dict):
        lines.append(f"ComfyUI refused the workflow: {error.get('message', '')} {error.get('details', '')}".strip())
    elif error:
        lines.append(f"ComfyUI refused the workflow: {error}")
    for node_id, info in (payload.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            extra = err.get("extra_info", {}) or {}
            name = extra.get("input_name")
            where = f"node {node_id} ({info.get('class_type', '?')})" + (f" input {name!r}" if name else "")
            lines.append(f"  {where}: {err.get('message', '')}: {err.get('details', '')}")
    return "\n".join(lines) or json.dumps(payload)


def format_execution_error(history: dict[str, Any]) -> str | None:
    status = history.get("status") or {}
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"ComfyUI error in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type', '')}: {str(data.get('exception_message', '')).strip()}")
        if kind == "execution_interrupted":
            return f"ComfyUI run interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    if status.get("status_str") == "error":
        return "ComfyUI reported an error (no details in /history)"
    return None


# -- a minimal websocket client (RFC 6455, text frames in, pong/close out) ----------------------------
class WebSocket:
    _GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            buf += chunk
        head, self._buf = buf.split(b"\r\n\r\n", 1)
        self._opcode, self._parts = 1, []  # type: ignore[var-annotated]
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"websocket handshake refused: {lines[0]}")
        accept = base64.b64encode(hashlib.sha1((key + self._GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("sec-websocket-accept") != accept:
            raise ConnectionError("websocket handshake: bad Sec-WebSocket-Accept")

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)

    def _need(self, n: int) -> None:
        """Buffer at least ``n`` bytes. A timeout leaves the buffer intact (frames are parsed in place
        and consumed only when whole), so the caller can simply call recv() again."""
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _frame(self) -> tuple[bool, int, bytes]:
        self._need(2)
        b0, b1 = self._buf[0], self._buf[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, pos = struct.unpack(">H", self._buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, pos = struct.unpack(">Q", self._buf[2:10])[0], 10
        mask = b""
        if b1 & 0x80:
            self._need(pos + 4)
            mask, pos = self._buf[pos:pos + 4], pos + 4
        self._need(pos + n)
        payload, self._buf = self._buf[pos:pos + n], self._buf[pos + n:]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv(self) -> tuple[int, bytes]:
        """The next whole message: (opcode, payload). Raises TimeoutError / ConnectionError."""
        while True:
            fin, opcode, payload = self._frame()
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by server")
            if opcode != 0:
                self._opcode, self._parts = opcode, []
            self._parts.append(payload)
            if fin:
                return self._opcode, b"".join(self._parts)

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


# -- running ------------------------------------------------------------------------------------------
def _default_printer(event: dict[str, Any]) -> None:
    kind, data = event.get("type"), event.get("data") or {}
    if kind == "progress":
        print(f"  node {data.get('node')}: step {data.get('value')}/{data.get('max')}", file=sys.stderr, flush=True)
    elif kind == "executing" and data.get("node") is not None:
        print(f"running node {data.get('node')}", file=sys.stderr, flush=True)
    elif kind == "execution_cached" and data.get("nodes"):
        print(f"cached (not re-run): {', '.join(map(str, data['nodes']))}", file=sys.stderr, flush=True)
    elif kind == "status-poll":
        print(f"waiting ({data.get('queue')})", file=sys.stderr, flush=True)


def run_workflow(client: Client, graph: dict[str, Any], out_dir: str | os.PathLike[str] | None,
                 on_event: Callable[[dict[str, Any]], None] | None = _default_printer,
                 timeout: float = 3600.0, use_websocket: bool = True) -> RunResult:
    """Submit ``graph``, wait for it, download its images into ``out_dir`` (None: don't download).
    Raises HeadlessError with ComfyUI's message when the run is refused or fails."""
    client_id = uuid.uuid4().hex
    ws = None
    if use_websocket:
        try:
            ws = WebSocket(client.host, client.port, f"/ws?clientId={client_id}", timeout=client.timeout)
        except (OSError, ConnectionError) as exc:
            logger.info("no websocket (%s); polling /history for progress", exc)
    events: list[dict[str, Any]] = []
    try:
        prompt_id = client.submit(graph, client_id)
        logger.info("queued prompt %s", prompt_id)
        history = _wait(client, ws, prompt_id, events, on_event, time.monotonic() + timeout)
    finally:
        if ws is not None:
            ws.close()
    error = format_execution_error(history)
    if error:
        raise HeadlessError(error, EXIT_FAILED, history)
    images = _download(client, history, out_dir) if out_dir is not None else []
    cached: list[str] = []
    for kind, data in (history.get("status") or {}).get("messages", []):
        if kind == "execution_cached":
            cached += [str(n) for n in data.get("nodes", [])]
    executed = [str(e["data"]["node"]) for e in events
                if e.get("type") == "executing" and (e.get("data") or {}).get("node") is not None]
    return RunResult(prompt_id, images, history, cached, executed, events)


def _wait(client: Client, ws: WebSocket | None, prompt_id: str, events: list[dict[str, Any]],
          on_event: Callable[[dict[str, Any]], None] | None, deadline: float) -> dict[str, Any]:
    last_poll = 0.0
    while True:
        now = time.monotonic()
        if now > deadline:
            raise HeadlessError(f"timed out waiting for prompt {prompt_id}", EXIT_UNREACHABLE)
        if ws is not None:
            ws.settimeout(1.0)
            try:
                opcode, payload = ws.recv()
            except TimeoutError:
                opcode, payload = 0, b""
            except (OSError, ConnectionError) as exc:
                logger.info("websocket lost (%s); polling /history", exc)
                ws = None
                continue
            if opcode == 1:
                event = json.loads(payload)
                data = event.get("data") or {}
                if data.get("prompt_id") in (None, prompt_id):
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
                    if event.get("type") in ("execution_error", "execution_interrupted", "execution_success") or (
                            event.get("type") == "executing" and data.get("node") is None
                            and data.get("prompt_id") == prompt_id):
                        last_poll = 0.0  # finished: fetch the history now
            if now - last_poll < 5.0:
                continue
        elif now - last_poll < 0.5:
            time.sleep(0.5 - (now - last_poll))
        last_poll = time.monotonic()
        history = client.history(prompt_id)
        if history is not None and (history.get("status") or {}).get("completed") is not None:
            return history
        if history is not None and history.get("outputs") is not None and history.get("status") is None:
            return history
        if ws is None and on_event is not None:
            queue = client.request("GET", "/queue") or {}
            on_event({"type": "status-poll", "data": {"queue": f"{len(queue.get('queue_running', []))} running, "
                                                               f"{len(queue.get('queue_pending', []))} pending"}})


def _download(client: Client, history: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for node_id, node_out in (history.get("outputs") or {}).items():
        for image in node_out.get("images", []):
            if image.get("type") == "temp" and not image.get("filename"):
                continue
            query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                            "type": image.get("type", "output")})
            target = out / Path(image["filename"]).name
            target.write_bytes(client.get_bytes(f"/view?{query}"))
            paths.append(target)
            logger.info("node %s: saved %s", node_id, target)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora_core.headless",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/flux_lora_basic.json)")
    parser.add_argument("--server", default="127.0.0.1:8188", help="ComfyUI host:port (default 127.0.0.1:8188)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                        help="override an input (repeatable); VALUE is JSON when it parses, else a string")
    parser.add_argument("--tiny", action="store_true",
                        help="run on the tiny model of `python -m fastlora_core write-tiny MODELS --comfy` "
                             "(FastLoRA's own workflows, seconds on a CPU); --set still overrides")
    parser.add_argument("--out", default="headless-output", help="folder for the downloaded images")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    parser.add_argument("--poll", action="store_true", help="poll /history instead of using the websocket")
    parser.add_argument("--print-prompt", action="store_true", help="print the final API graph and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        graph = load_workflow(args.workflow)
        graph = apply_overrides(graph, (tiny_overrides(graph) if args.tiny else []) + args.sets)
        if args.print_prompt:
            print(json.dumps(graph, indent=2))
            return EXIT_OK
        result = run_workflow(Client(args.server), graph, args.out, None if args.quiet else _default_printer,
                              args.timeout, use_websocket=not args.poll)
    except HeadlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in result.images:
        print(path)
    if not result.images:
        print("done (the workflow saved no images)", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
