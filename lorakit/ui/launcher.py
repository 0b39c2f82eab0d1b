"""Start `lorakit train` as its own process (its own session, so it outlives the page's tab and even the page's
server), remember it in a launch record under `<runs dir>/.lorakit-ui/<name>/` and stop it on request.

The record holds launch.json (the command, the process id, when), stdout.log and stderr.log (the CLI's summary
line and its one-line error), returncode once the process ended and `stopped` when the page stopped it. Anything
`lorakit train` itself writes stays in the run's own directory, so `lorakit train CONFIG --resume` continues it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.ui.security import UiSettings
from lorakit.ui.validation import LaunchPlan

RECORDS = ".lorakit-ui"


def record_dir(settings: UiSettings, name: str) -> Path:
    return settings.runs_dir / RECORDS / name


class Launcher:
    """The runs this server started; status survives a restart through the launch records."""

    def __init__(self, settings: UiSettings):
        self.settings = settings
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()

    def running(self) -> set[str]:
        with self.lock:
            return {name for name, p in self.processes.items() if p.poll() is None}

    def start(self, plan: LaunchPlan) -> dict[str, Any]:
        """Start the run of a checked plan; returns its launch record."""
        record = record_dir(self.settings, plan.name)
        record.mkdir(parents=True, exist_ok=True)
        for stale in ("returncode", "stopped", "stdout.log", "stderr.log"):
            (record / stale).unlink(missing_ok=True)
        if plan.recipe is not None:
            config = plan.recipe
        else:
            config = record / str(plan.upload_name)
            config.write_text(str(plan.upload_text), encoding="utf-8")
        argv = ["train", self.settings.shown(config), *plan.overrides]
        info = {"name": plan.name, "argv": argv, "command": "lorakit " + " ".join(argv),
                "resume": "lorakit " + " ".join([*argv, "--resume"]), "out_dir": self.settings.shown(plan.out_dir),
                "task": plan.config.data.task, "model": plan.config.model.name, "rank": plan.config.lora.rank,
                "max_steps": plan.config.optim.max_steps, "method": plan.config.run.method}
        return self._spawn(plan.name, argv, info)

    def resume(self, name: str) -> dict[str, Any]:
        """Continue a stopped or failed run from its newest checkpoint (`lorakit train ... --resume`)."""
        info = read_launch(self.settings, name)
        if info is None or not isinstance(info.get("argv"), list):
            raise LorakitError(f"run {name!r} was not started from this page; resume it with lorakit train CONFIG "
                               "--resume")
        if self.is_running(name, info):
            raise LorakitError(f"run {name!r} is running; stop it before resuming it")
        for stale in ("returncode", "stopped"):
            (record_dir(self.settings, name) / stale).unlink(missing_ok=True)
        return self._spawn(name, [*info["argv"], "--resume"], info)

    def _spawn(self, name: str, argv: list[str], info: dict[str, Any]) -> dict[str, Any]:
        record = record_dir(self.settings, name)
        env = dict(os.environ, LORAKIT_PROGRESS="1", PYTHONUNBUFFERED="1")
        with open(record / "stdout.log", "ab") as out, open(record / "stderr.log", "ab") as err:
            process = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], cwd=self.settings.root, stdout=out,
                                       stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        info = info | {"pid": process.pid, "started": info.get("started") or time.time()}
        (record / "launch.json").write_text(json.dumps(info, indent=2))
        with self.lock:
            self.processes[name] = process
        threading.Thread(target=_wait, args=(process, record), daemon=True).start()
        return info

    def stop(self, name: str) -> None:
        """Stop a run this page started (its whole process group); raises LorakitError for one that is not
        running."""
        info = read_launch(self.settings, name)
        with self.lock:
            process = self.processes.get(name)
        alive = process.poll() is None if process is not None else (info is not None and _alive(info["pid"]))
        if info is None or not alive:
            raise LorakitError(f"run {name!r} is not running; nothing to stop")
        (record_dir(self.settings, name) / "stopped").write_text(str(time.time()))
        try:
            os.killpg(info["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass

    def is_running(self, name: str, info: dict[str, Any] | None) -> bool:
        with self.lock:
            process = self.processes.get(name)
        if process is not None:
            return process.poll() is None
        record = record_dir(self.settings, name)
        return info is not None and not (record / "returncode").exists() and _alive(int(info["pid"]))


def read_launch(settings: UiSettings, name: str) -> dict[str, Any] | None:
    path = record_dir(settings, name) / "launch.json"
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _wait(process: subprocess.Popen[bytes], record: Path) -> None:
    code = process.wait()
    (record / "returncode").write_text(str(code))


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs lorakit (after a server restart; a reused pid runs something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return b"lorakit" in cmdline
