"""`make image-test`: build the Dockerfile with podman, then run the image as its own user and check it.

No container runtime is needed (none works on the machines this was written on): podman builds with
`--isolation=chroot`, the image's filesystem is exported to a temporary directory, and its ENTRYPOINT + CMD
run there under `chroot --userspec` with the image's USER and Env, on the host's network (the one edit: the
image's config listens on 127.0.0.1, port 0, instead of 0.0.0.0:8765). One line per check; exit status 1 when
any check fails. Needs root and podman; without the `python:3.11-slim` image and without Docker Hub, a stand-in
for it is made from Debian's packages with mmdebstrap (cached in .cache/image/, which is gitignored).

Not collected by pytest (the name does not start with test_): `make test` needs no podman.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "image"
BASE = "docker.io/library/python:3.11-slim"  # the Dockerfile's FROM, as podman names it
TAG = "localhost/realtime-reset-proxy:image-test"
# The stand-in has what the Dockerfile needs of the base: python (as `python` too), venv, pip, CA certificates.
STAND_IN_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
START_SECONDS = 30.0  # from exec to the `listening` line; a cold start takes ~1 s
STOP_SECONDS = 15.0  # SIGTERM with no open session: the drain ends at once
# The venv's own tools come from the base's ensurepip, not from the lock; the project is built from source.
NOT_LOCKED = {"pip", "setuptools", "realtime-reset-proxy"}


class Fatal(Exception):
    """A step that later checks depend on failed: reported as the failed check `name`, and the run ends."""

    def __init__(self, detail: str, name: str = "abort") -> None:
        super().__init__(detail)
        self.name = name


class Report:
    """Prints one line per check as it is decided and remembers whether any failed."""

    def __init__(self) -> None:
        self.failed = 0
        self.count = 0

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.count += 1
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:<9} {detail}", flush=True)
        return ok


def run(*cmd: str, timeout: float = 600.0, log: Path | None = None) -> str:
    """Run a command to completion; its stdout, or Fatal with the tail of its output (the full log in `log`)."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if log is not None:
        log.write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        where = f" (log: {log})" if log is not None else ""
        raise Fatal(f"`{' '.join(cmd[:3])} ...` exited {result.returncode}{where}: {tail}")
    return result.stdout


def ensure_base() -> str:
    """The Dockerfile's base image, present, pulled, or (Docker Hub unreachable) a Debian stand-in imported."""
    if subprocess.run(["podman", "image", "exists", BASE], check=False).returncode == 0:
        return "already present"
    pulled = subprocess.run(["podman", "pull", "-q", BASE], capture_output=True, timeout=300, check=False)
    if pulled.returncode == 0:
        return "pulled"
    if shutil.which("mmdebstrap") is None:
        raise Fatal(f"{BASE} is neither present nor pullable, and mmdebstrap (for a stand-in) is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "bookworm-python3.tar"
    if not rootfs.exists():
        partial = rootfs.with_suffix(".partial.tar")
        run("mmdebstrap", "--quiet", "--variant=apt", f"--include={STAND_IN_PACKAGES}", "bookworm", str(partial))
        partial.rename(rootfs)
    run("podman", "import", "--quiet", str(rootfs), BASE)
    return "Debian bookworm stand-in imported (mmdebstrap; Docker Hub unreachable)"


def build() -> None:
    # chroot isolation needs no container runtime; --format docker keeps HEALTHCHECK (OCI has no such field).
    cmd = ["podman", "build", "--isolation=chroot", "--network", "host", "--format", "docker", "-t", TAG]
    if Path("/etc/ssl/certs").is_dir():  # the host's CAs, for a network whose TLS is re-signed on the way to PyPI
        cmd += ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
    CACHE.mkdir(parents=True, exist_ok=True)
    run(*cmd, str(ROOT), log=CACHE / "build.log")


def export(into: Path) -> None:
    """The image's filesystem, as a container of it would see it (device nodes included), extracted as root."""
    container = run("podman", "create", "--no-healthcheck", TAG).strip()
    try:
        archive = into.with_suffix(".tar")
        run("podman", "export", "--output", str(archive), container)
        into.mkdir()
        run("tar", "--extract", "--numeric-owner", "--file", str(archive), "--directory", str(into))
        archive.unlink()
    finally:
        subprocess.run(["podman", "rm", "--force", container], capture_output=True, check=False)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    text = (ROOT / "locks" / "image.txt").read_text(encoding="utf-8")
    return {normalize(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, re.M)}


def installed_versions(rootfs: Path) -> dict[str, str]:
    """name -> version of every distribution in the image's venv, from the .dist-info directory names."""
    found: dict[str, str] = {}
    for info in rootfs.glob("opt/venv/lib/python3*/site-packages/*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        found[normalize(name)] = version
    return found


def passwd_entry(rootfs: Path, uid: int) -> list[str] | None:
    for line in (rootfs / "etc" / "passwd").read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[2] == str(uid):
            return fields
    return None


def listen_on_loopback(config_text: str) -> str:
    """The config with only `[listen] host` and `port` changed: 127.0.0.1, and port 0 (the kernel picks)."""
    lines, section = [], ""
    for line in config_text.splitlines(keepends=True):
        if re.match(r"\s*\[", line):
            section = line.strip()
        elif section == "[listen]" and re.match(r"host\s*=", line):
            line = 'host = "127.0.0.1"\n'
        elif section == "[listen]" and re.match(r"port\s*=", line):
            line = "port = 0\n"
        lines.append(line)
    return "".join(lines)


class Process:
    """The entrypoint under chroot, its output lines read by a thread so that waits have deadlines."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.popen = subprocess.Popen(
            argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_event(self, event: str, timeout: float) -> dict[str, Any]:
        """The first JSON log line with this `event`; Fatal at EOF or when the deadline passes."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise Fatal(f"exited {self.popen.wait()} before {event!r}; output: {' | '.join(self.lines[-5:])}")
            self.lines.append(line.rstrip("\n"))
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                return record
        raise Fatal(f"no {event!r} line within {timeout:.0f} s; output: {' | '.join(self.lines[-5:])}")

    def ids(self) -> tuple[list[int], list[int]]:
        """Real, effective, saved and filesystem uids and gids of the running process, from /proc."""
        try:
            status = Path(f"/proc/{self.popen.pid}/status").read_text(encoding="utf-8")
        except FileNotFoundError:
            raise Fatal(f"exited {self.popen.wait()} right after `listening`") from None
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
        assert uids is not None and gids is not None
        return [int(x) for x in uids[1].split()], [int(x) for x in gids[1].split()]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@contextmanager
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="image-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    report = Report()
    if os.geteuid() != 0:
        report.check("setup", False, "needs root (rootful podman, chroot)")
        return 1
    missing = [tool for tool in ("podman", "chroot", "tar") if shutil.which(tool) is None]
    if missing:
        report.check("setup", False, f"not installed: {', '.join(missing)} (apt-get install -y podman mmdebstrap)")
        return 1
    with scratch() as tmp:
        try:
            checks(report, tmp / "rootfs")
        except Fatal as exc:
            report.check(exc.name, False, str(exc))
    print(f"image-test: {report.count - report.failed}/{report.count} checks passed", flush=True)
    return 1 if report.failed else 0


def checks(report: Report, rootfs: Path) -> None:
    started = time.monotonic()
    base = ensure_base()
    build()
    export(rootfs)
    (image,) = json.loads(run("podman", "image", "inspect", TAG))
    config = image["Config"]
    official = (rootfs / "usr/local/bin/python").exists()  # python.org's build; Debian's is /usr/bin/python3
    python = "/usr/local/bin/python (official image)" if official else "/usr/bin/python3 (Debian stand-in)"
    report.check(
        "build",
        True,
        f"{TAG} ({image['Id'][:12]}) in {time.monotonic() - started:.0f} s; base {BASE}: {base}; its python: {python}",
    )

    user = config.get("User", "")
    numeric = re.fullmatch(r"(\d+):(\d+)", user)
    uid, gid = (int(numeric[1]), int(numeric[2])) if numeric else (-1, -1)
    entry = passwd_entry(rootfs, uid) if numeric else None
    if numeric and uid != 0 and gid != 0:
        named = f"/etc/passwd names it {entry[0]!r}, shell {entry[6]}" if entry else "no /etc/passwd entry"
        report.check("user", True, f"USER {user}: numeric, non-root; {named}")
    else:  # nothing to run it as: the checks that run the image cannot be made
        raise Fatal(f"USER {user!r}: want a numeric non-root uid:gid", name="user")

    locked, installed = locked_versions(), installed_versions(rootfs)
    strays = {n: v for n, v in installed.items() if n not in NOT_LOCKED and locked.get(n) != v}
    report.check(
        "locked",
        bool(installed) and not strays,
        f"{len(installed) - len(NOT_LOCKED & installed.keys())} packages in /opt/venv, each at its locks/image.txt "
        f"version (uvloop: {installed.get('uvloop', 'not installed')})"
        if not strays
        else f"not as locked: {strays}",
    )

    entrypoint, cmd = config.get("Entrypoint") or [], config.get("Cmd") or []
    config_path = cmd[1] if len(cmd) == 2 and cmd[0] == "--config" else ""
    shipped = rootfs / config_path.lstrip("/")
    if not config_path or not shipped.is_file():
        raise Fatal(f"CMD {cmd} does not name a config file in the image")
    text = shipped.read_text(encoding="utf-8")
    listen = tomllib.loads(text)["listen"]
    exposed = sorted(config.get("ExposedPorts") or {})
    probe = " ".join((image.get("Healthcheck") or {}).get("Test") or [])
    probed = re.search(r"127\.0\.0\.1:(\d+)/healthz", probe)
    port, probed_port = listen.get("port"), probed[1] if probed else "?"
    report.check(
        "config",
        listen.get("host") == "0.0.0.0" and exposed == [f"{port}/tcp"] and probed_port == str(port),
        f"{' '.join(entrypoint + cmd)}: listens on {listen.get('host')}:{port}, EXPOSE {' '.join(exposed)}, "
        f"HEALTHCHECK probes port {probed_port}",
    )

    # The test's one edit to the image: listen on loopback, on a port the kernel picks, not 0.0.0.0:8765.
    edited = listen_on_loopback(text)
    expected = tomllib.loads(text)
    expected["listen"].update(host="127.0.0.1", port=0)
    if tomllib.loads(edited) != expected:
        raise Fatal("rewriting [listen] host/port changed more of the config than those two keys")
    shipped.write_text(edited, encoding="utf-8")

    env = dict(line.partition("=")[::2] for line in config.get("Env") or [])
    env.setdefault("HOME", entry[5] if entry else "/")  # as docker does for a user with a passwd entry
    chroot = shutil.which("chroot")
    assert chroot is not None
    process = Process([chroot, f"--userspec={uid}:{gid}", str(rootfs), *entrypoint, *cmd], env)
    try:
        serving(report, process, uid, gid)
    finally:
        process.stop()


def serving(report: Report, process: Process, uid: int, gid: int) -> None:
    started = time.monotonic()
    listening = process.wait_for_event("listening", START_SECONDS)
    uids, gids = process.ids()
    report.check(
        "runs-as",
        set(uids) == {uid} and set(gids) == {gid},
        f"the entrypoint's process (pid {process.popen.pid}) has uid {uids[0]}, gid {gids[0]} "
        f"(real/effective/saved/fs), `listening` after {time.monotonic() - started:.1f} s",
    )
    report.check("loop", listening.get("loop") == "uvloop", f'`listening` line says "loop":"{listening.get("loop")}"')

    # The admin routes are on the main port unless [admin] port is set; the line names the port either way.
    url = f"http://127.0.0.1:{listening['admin_port']}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP proxy for a loopback URL
    try:
        with opener.open(url, timeout=5) as response:
            status, body = response.status, response.read(200).decode(errors="replace").strip()
    except OSError as exc:
        status, body = 0, str(exc)
    report.check("healthz", status == 200, f"GET {url} -> {status} {body!r}")

    process.popen.send_signal(signal.SIGTERM)
    try:
        process.wait_for_event("stopped", STOP_SECONDS)
        code = process.popen.wait(timeout=STOP_SECONDS)
    except (Fatal, subprocess.TimeoutExpired) as exc:
        report.check("stop", False, f"SIGTERM: {exc}")
        return
    report.check("stop", code == 0, f"SIGTERM -> drained, `stopped`, exit status {code}")


if __name__ == "__main__":
    sys.exit(main())
