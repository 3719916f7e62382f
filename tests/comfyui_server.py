"""A real ComfyUI server for the node tests: unpacked from the test bed, started, driven over HTTP, stopped.

Every wait is bounded; :meth:`ComfyServer.stop` always ends the process it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbeds" / "comfyui-0.8.0.tar.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PromptRejected(Exception):
    """POST /prompt answered 400: ComfyUI's validation refused the workflow (``.body`` holds its answer)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(json.dumps(body)[:2000])
        self.body = body


class ComfyServer:
    """One ComfyUI process on 127.0.0.1:``port`` with its folder ``root`` (``ComfyUI/``)."""

    def __init__(self, root: Path, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.root, self.port, self.proc, self.log = root, port, proc, log
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex

    # -- HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def queue(self, prompt: dict[str, Any]) -> str:
        """Queue an API-format workflow; its prompt id. PromptRejected if ComfyUI's validation refuses it."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(body if isinstance(body, dict) else {"error": body})
        return str(body["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 300) -> dict[str, Any]:
        """The /history entry of a finished prompt (outputs and status)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s; server log tail:\n{self.log_tail()}")

    def run(self, prompt: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        return self.wait(self.queue(prompt), timeout)

    def run_watched(self, prompt: dict[str, Any], on_message: Callable[[dict[str, Any], "ComfyServer"], None],
                    timeout: float = 300) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Queue ``prompt`` with a websocket open; every JSON message of this prompt goes to ``on_message`` as it
        arrives. Returns the /history entry and the messages."""
        import aiohttp

        async def watch() -> tuple[str, list[dict[str, Any]]]:
            seen: list[dict[str, Any]] = []
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}") as ws:
                    prompt_id = await asyncio.to_thread(self.queue, prompt)
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue  # binary previews
                        m = json.loads(msg.data)
                        if (m.get("data") or {}).get("prompt_id") not in (prompt_id, None):
                            continue
                        seen.append(m)
                        await asyncio.to_thread(on_message, m, self)
                        if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                            break
            return prompt_id, seen

        prompt_id, seen = asyncio.run(asyncio.wait_for(watch(), timeout))
        return self.wait(prompt_id, timeout), seen

    # -- process
    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.log_text().count(text) >= count:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def unpack(dest: Path) -> Path:
    """The test bed unpacked under ``dest``; its ``ComfyUI/`` folder."""
    with tarfile.open(TESTBED) as tar:
        tar.extractall(dest, filter="data")
    return dest / "ComfyUI"


def start(root: Path, threads: int, timeout: float = 120) -> ComfyServer:
    """Start ``root/main.py --cpu`` with this Python and wait until GET /system_stats answers."""
    port = free_port()
    log = root / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # the test process's: the same sums
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)],
                                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = ComfyServer(root, port, proc, log)
    end = time.monotonic() + timeout
    try:
        while True:
            server._check_alive()
            try:
                status, _ = server.request("GET", "/system_stats", timeout=5)
                if status == 200:
                    return server
            except OSError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"ComfyUI did not answer in {timeout} s; log tail:\n{server.log_tail()}")
            time.sleep(0.25)
    except BaseException:
        server.stop()
        raise


# -- the UI (graph) format of a workflow, as the frontend turns it into the API format for /prompt

_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """An API-format prompt from a UI-format workflow, with the node definitions of GET /object_info: linked
    inputs from ``links``, widget values in the order of the node's inputs (a seed's "control after generate"
    value and an upload widget's value skipped). Raises AssertionError where the workflow does not fit."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, origin, slot, target, _, _ = links[inp["link"]]
                assert target == node["id"], f"link {inp['link']} does not end at node {node['id']}"
                inputs[inp["name"]] = [str(origin), slot]
        values = list(node.get("widgets_values", []))
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info.get("input_order", {}).get("required", []) + info.get("input_order", {}).get("optional", []):
            spec = specs[name]
            if not _is_widget(spec):
                continue
            assert values, f"node {node['id']} ({node['type']}): no widget value left for {name}"
            value = values.pop(0)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("control_after_generate"):
                values.pop(0)
            if any(k.endswith("_upload") and v for k, v in opts.items()):
                values.pop(0)
            inputs.setdefault(name, value)  # a widget turned into a linked input keeps the link
        assert not values, f"node {node['id']} ({node['type']}): widget values left over: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
