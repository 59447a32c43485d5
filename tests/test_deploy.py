"""The deployment files, without Docker: docker-compose.yml, the Dockerfile, .dockerignore and
deploy/kubernetes.yaml are checked against each other, against pyproject.toml and
requirements-dev.txt, and against the command lines' parsers; then every compose service's
command runs as a local process (docs/deployment.md, "Testing without Docker")."""

from __future__ import annotations

import importlib.util
import json
import os
import posixpath
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from client import ClusterSpec, MemstoreClient
from client.cluster_spec import ShardAddresses
from memstore.cli import _parser as memstore_parser
from memstore.etcd import EtcdClient
from memstore.membership import MemberRecord, members_prefix
from memstore.service import SERVICE_NAME
from tests.etcd_server import EtcdServer, require_etcd
from tests.helpers import FAST_FAIL

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
CLUSTER_FILE = REPO / "deploy" / "cluster.toml"
KUBERNETES_FILE = REPO / "deploy" / "kubernetes.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Where the compose file's daemons register, and the demo finds them.
ETCD = "etcd:2379"
CLUSTER_NAME = "engram"
# Compose interpolates ${NAME:-default} from the caller's environment; the test fixes it.
COMPOSE_ENV = {"DEMO_STEPS": "2"}
# A shell keyword or builtin that may start a line before the command it runs.
SHELL_PREFIXES = {"exec", "if", "then", "else", "do", "until", "while", "!"}


# ---- reading the files -------------------------------------------------------------------------


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${NAME}, ${NAME:-default}, $$) over a parsed file."""
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group("name"), match.group("default")
        if name in env:
            return env[name]
        if default is None:
            raise AssertionError(f"${{{name}}} has no default and the test does not set it")
        return default

    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}", substitute, value)


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


@dataclass(frozen=True)
class Instruction:
    stage: int  # 0 for the first FROM
    keyword: str
    args: str


def _dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions in order, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions, stage = [], -1
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        stage += keyword.upper() == "FROM"
        instructions.append(Instruction(stage, keyword.upper(), " ".join(args.split())))
    return instructions


def _final_stage() -> list[Instruction]:
    instructions = _dockerfile()
    return [i for i in instructions if i.stage == instructions[-1].stage]


def _arg_defaults() -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in _dockerfile() if i.keyword == "ARG" and "=" in i.args)


def _image_workdir() -> str:
    return [i.args for i in _final_stage() if i.keyword == "WORKDIR"][-1]


def _image_entrypoint() -> list[str]:
    return json.loads([i.args for i in _final_stage() if i.keyword == "ENTRYPOINT"][-1])


def _argv(service: dict[str, Any]) -> list[str]:
    """What a compose service runs: its entrypoint (or the image's) and its command."""
    entrypoint = service.get("entrypoint", _image_entrypoint())
    command = service.get("command", [])
    assert isinstance(entrypoint, list) and isinstance(command, list), "use the exec (list) form"
    return [*entrypoint, *command]


def _healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", "healthchecks run the command itself (exec form), not a shell"
    return test[1:]


def _simple_commands(argv: list[str]) -> list[list[str]]:
    """The commands an argv runs: itself, or those of a small `sh -c` script (split at newlines,
    ;, && and ||, leading shell keywords dropped)."""
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    commands = []
    for line in argv[2].splitlines():
        for part in re.split(r"&&|\|\||;", line):
            words = shlex.split(part, comments=True)
            while words and words[0] in SHELL_PREFIXES:
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def _demo_parser():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._parser()


def _parse(words: list[str]) -> Any:
    """Parse a `memstore ...` or `python scripts/demo.py ...` command line with its own parser;
    None for anything else (sh builtins, cp, ...)."""
    if words[0] == "memstore":
        parser, args = memstore_parser(), words[1:]
    elif words[:2] == ["python", "scripts/demo.py"]:
        parser, args = _demo_parser(), words[2:]
    else:
        return None
    try:
        return parser.parse_args(args)
    except SystemExit:
        raise AssertionError(f"{shlex.join(words)!r} does not parse (see the usage error above)") from None


def _daemons(compose: dict[str, Any]) -> dict[str, Any]:
    """Service name -> parsed `memstore serve` arguments, for every daemon."""
    argvs = {name: _argv(service) for name, service in compose["services"].items()}
    parsed = {name: _parse(argv) for name, argv in argvs.items() if argv[0] == "memstore"}
    return {name: args for name, args in parsed.items() if getattr(args, "command", None) == "serve"}


def _followers(daemons: dict[str, Any], primary: str) -> list[str]:
    return [name for name, args in daemons.items() if args.follow and args.follow.rpartition(":")[0] == primary]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


# ---- the compose file --------------------------------------------------------------------------


def test_compose_runs_two_shards_of_a_primary_and_a_replica() -> None:
    compose = _compose()
    services = compose["services"]
    daemons = _daemons(compose)
    primaries = sorted(name for name, args in daemons.items() if args.follow is None)
    assert len(primaries) == 2 and len(daemons) == 4
    for name, args in daemons.items():
        service = services[name]
        assert args.listen == "0.0.0.0:50051", f"{name} must listen on every interface of its container"
        check = _parse(_healthcheck_argv(service))
        assert check is not None and check.command == "health", f"{name}'s healthcheck is not `memstore health`"
        assert check.address == f"127.0.0.1:{_port(args.listen)}" and check.service == SERVICE_NAME
        assert service["depends_on"]["table-init"] == {"condition": "service_completed_successfully"}
        # Registered in the compose file's etcd, at the address other containers reach it by.
        assert (args.etcd, args.cluster_name, args.advertise) == (ETCD, CLUSTER_NAME, f"{name}:{_port(args.listen)}")
        assert service["depends_on"]["etcd"] == {"condition": "service_healthy"}
        # Each shard fails over by itself, losing no acknowledged push: its one replica holds each first.
        assert args.failover and args.sync_replicas == 1, f"{name} must take part in failover, synchronously"
        if args.follow is not None:
            primary = args.follow.rpartition(":")[0]
            assert primary in primaries and args.follow == f"{primary}:{_port(daemons[primary].listen)}"
            assert service["depends_on"][primary] == {"condition": "service_healthy"}
            assert args.path != daemons[primary].path, "a replica serves its own copy of the table"
    followers = {primary: _followers(daemons, primary) for primary in primaries}
    assert all(len(names) == 1 for names in followers.values())

    # Each shard's daemons share one network alias, the name its read target resolves.
    aliases = {name: services[name]["networks"]["memstore"]["aliases"] for name in daemons}
    for primary in primaries:
        (alias,) = aliases[primary]
        assert [aliases[name] for name in followers[primary]] == [[alias]]
    assert len({tuple(a) for a in aliases.values()}) == 2

    # The init job creates the table the primaries serve, sharded in as many shards, and the
    # replicas' copy of it.
    init = services["table-init"]
    assert "healthcheck" not in init and "depends_on" not in init
    commands = _simple_commands(_argv(init))
    (created,) = [args for args in map(_parse, commands) if args is not None]
    assert created.create_only and created.shards == len(primaries)
    assert sorted(str(daemons[name].path) for name in primaries) == [
        f"{created.table}/shard-{shard}" for shard in range(len(primaries))
    ]
    (replica_dir,) = {
        str(daemons[name].path).rpartition("/shard-")[0] for names in followers.values() for name in names
    }
    (copy,) = [words for words in commands if words[0] == "cp"]
    (move,) = [words for words in commands if words[0] == "mv"]
    assert copy == ["cp", "-a", str(created.table), move[1]] and move[2] == replica_dir

    demo = services["demo"]
    assert demo["depends_on"] == {name: {"condition": "service_healthy"} for name in sorted(daemons)}
    found = _parse(_argv(demo))  # the demo finds the daemons in etcd
    assert (found.etcd, found.cluster_name, found.cluster) == (ETCD, CLUSTER_NAME, None)
    etcd = services["etcd"]
    assert etcd["image"].endswith(":v3.4.23"), "etcd 3.4, as Debian ships it (3.5.0-3.5.2 are unsafe)"
    assert f"--advertise-client-urls=http://{ETCD}" in _argv(etcd) and "etcd" in compose["volumes"]
    assert _parse(_argv(_compose(COMPOSE_ENV)["services"]["demo"])).steps == int(COMPOSE_ENV["DEMO_STEPS"])

    # One image for every service but etcd, built from this directory.
    assert {(s["image"], s["build"]) for name, s in services.items() if name != "etcd"} == {
        (f"engram-memstore:{PYPROJECT['project']['version']}", ".")
    }
    assert set(compose["volumes"]) >= {"tables", "data"}


def test_cluster_spec_names_the_compose_services() -> None:
    compose = _compose()
    daemons = _daemons(compose)
    services = compose["services"]
    spec = ClusterSpec.from_file(CLUSTER_FILE)
    expected = []
    for shard in range(len(spec.shards)):
        (primary,) = [n for n, a in daemons.items() if a.follow is None and str(a.path).endswith(f"/shard-{shard}")]
        port = _port(daemons[primary].listen)
        replicas = tuple(f"{n}:{port}" for n, a in daemons.items() if a.follow == f"{primary}:{port}")
        (alias,) = services[primary]["networks"]["memstore"]["aliases"]
        expected.append(ShardAddresses(f"{primary}:{port}", replicas, f"dns:///{alias}:{port}"))
    assert spec == ClusterSpec(tuple(expected))
    assert len(spec.shards) == 2


def test_every_command_line_parses() -> None:
    """Compose's and Kubernetes' `memstore` and demo command lines use flags that exist."""
    compose = _compose()
    argvs = [_argv(service) for service in compose["services"].values()]
    argvs += [_healthcheck_argv(s) for s in compose["services"].values() if "healthcheck" in s]
    for document in _kubernetes():
        for container in _containers(document):
            argvs.append([*container.get("command", _image_entrypoint()), *container.get("args", [])])
    parsed = [_parse(words) for argv in argvs for words in _simple_commands(argv)]
    # The demo's parser has no subcommands.
    assert {getattr(args, "command", "demo") for args in parsed if args is not None} == {"demo", "health", "serve"}


# ---- the image ---------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_as_pyproject_declares() -> None:
    instructions = _dockerfile()
    args = _arg_defaults()
    pins = dict(
        line.split("==", 1) for line in (REPO / "requirements-dev.txt").read_text().splitlines() if "==" in line
    )
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(args["PYTHON_VERSION"])
    assert {i.args.split()[0] for i in instructions if i.keyword == "FROM"} == {"python:${PYTHON_VERSION}-slim"}

    # Two installs: torch from its index, then the project with pyproject's dependencies. No
    # other package is named, so the image cannot drift from pyproject.toml.
    installs = [cmd.split() for i in instructions if i.keyword == "RUN" for cmd in i.args.split("&&") if "pip " in cmd]
    assert installs[0] == ["pip", "install", "--index-url", '"$TORCH_INDEX_URL"', '"torch==$TORCH_VERSION"']
    assert installs[1][:2] == ["pip", "install"] and len(installs) == 2 and len(installs[1]) == 3
    project, extra = installs[1][2].strip('"').removesuffix("]").split("[")
    assert extra == "model"  # the image runs the demo model too
    copied = {
        word for i in instructions if i.keyword == "COPY" and i.args.split()[-1].rstrip("/").startswith(project)
        for word in i.args.split()[:-1]
    }  # fmt: skip
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied == {"pyproject.toml", PYPROJECT["project"]["readme"], *packages}

    final = _final_stage()
    for instruction in final:  # the files the image's commands use beside the installed packages
        if instruction.keyword == "COPY" and not instruction.args.startswith("--from"):
            assert all((REPO / source).is_file() for source in instruction.args.split()[:-1])
    assert [i.args for i in final if i.keyword == "USER"][-1].split(":")[0] not in ("root", "0")
    assert [i.args for i in final if i.keyword == "EXPOSE"] == ["50051"]
    assert _image_entrypoint() == list(PYPROJECT["project"]["scripts"])

    ignored = set((REPO / ".dockerignore").read_text().split())
    assert ignored >= {".venv", "tables", "data", "runs", "**/__pycache__", ".pytest_cache", "**/*.so"}


# ---- the Kubernetes manifest -------------------------------------------------------------------


def _kubernetes() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(KUBERNETES_FILE.read_text()) if document]


def _containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] not in ("Job", "StatefulSet", "Deployment"):
        return []
    pod = document["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_kubernetes_shards_register_in_the_etcd_the_demo_reads() -> None:
    documents = _kubernetes()
    by_kind: dict[str, dict[str, Any]] = {}
    for document in documents:
        by_kind.setdefault(document["kind"], {})[document["metadata"]["name"]] = document
    image = _compose()["services"]["demo"]["image"]
    sets = dict(by_kind["StatefulSet"])
    etcd = sets.pop("etcd")
    assert {c["image"] for d in documents if d is not etcd for c in _containers(d)} == {image}
    (etcd_container,) = _containers(etcd)
    assert etcd_container["image"].endswith(":v3.4.23"), "etcd 3.4, as Debian ships it (3.5.0-3.5.2 are unsafe)"
    assert f"--advertise-client-urls=http://{ETCD}" in etcd_container["args"]
    assert by_kind["Service"]["etcd"]["spec"]["ports"][0]["port"] == _port(ETCD)

    assert len(sets) == 2
    for name, stateful in sorted(sets.items()):
        service = by_kind["Service"][stateful["spec"]["serviceName"]]
        assert service["spec"]["clusterIP"] == "None", "a headless service: each pod has a DNS name"
        labels = stateful["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"] == stateful["spec"]["selector"]["matchLabels"] == labels
        pods = [
            f"{name}-{ordinal}.{service['metadata']['name']}:50051" for ordinal in range(stateful["spec"]["replicas"])
        ]
        (daemon,) = stateful["spec"]["template"]["spec"]["containers"]
        assert daemon["readinessProbe"]["grpc"] == {"port": 50051, "service": SERVICE_NAME}
        serves = [_parse(words) for words in _simple_commands([*daemon["command"], *daemon["args"]])]
        serves = [args for args in serves if args is not None]
        assert [args.follow for args in serves] == [None, pods[0]]
        for args in serves:  # each pod registers as its own DNS name ($HOSTNAME is the pod's name)
            assert (args.etcd, args.cluster_name) == (ETCD, CLUSTER_NAME)
            assert args.advertise == f"$HOSTNAME.{service['metadata']['name']}:50051"
            assert args.failover and args.sync_replicas == 1  # one replica per shard: failover loses nothing
    assert set(by_kind["Job"]) == {"table-init", "demo"}
    (demo,) = by_kind["Job"]["demo"]["spec"]["template"]["spec"]["containers"]
    found = _parse([*demo["command"], *demo["args"]])
    assert (found.etcd, found.cluster_name) == (ETCD, CLUSTER_NAME)


# ---- the compose services as local processes ---------------------------------------------------


class LocalCompose:
    """docker-compose.yml's services as processes on this host.

    - The image's WORKDIR is a temporary directory holding what the Dockerfile's final stage
      copies there; commands run in it with `python` and `memstore` from this interpreter.
    - Named volumes are temporary directories; a mount inside the WORKDIR is a link to its volume.
    - A daemon listens on 127.0.0.1, port 0 (its port file says which); "SERVICE:PORT" and the
      container's own 127.0.0.1:PORT become 127.0.0.1:<that daemon's port>. It registers in etcd
      at that address (no --advertise: its default is the loopback address it listens on).
    - The etcd service is the etcd scripts/get_etcd.sh unpacks, on a free loopback port.
    """

    def __init__(self, compose: dict[str, Any], root: Path) -> None:
        self.services = compose["services"]
        self.root = root
        self.workdir = root / "app"
        self.volumes = {name: root / "volumes" / name for name in compose.get("volumes", {})}
        self.ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.done: set[str] = set()
        self._logs: list[Any] = []
        self._container_port = {name: _port(args.listen) for name, args in _daemons(compose).items()}
        self._container_port["etcd"] = _port(ETCD)
        self.etcd: EtcdServer | None = None
        self.mounts: dict[str, Path] = {}  # container path outside the workdir -> local path
        self._copy_image_files()
        self._mount_volumes()
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name, command in (("python", sys.executable), ("memstore", f"{sys.executable} -m memstore")):
            (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
            (bin_dir / name).chmod(0o755)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }

    def _copy_image_files(self) -> None:
        """What the final stage copies from the build context into the WORKDIR."""
        for instruction in _final_stage():
            if instruction.keyword == "COPY" and not instruction.args.startswith("--from"):
                *sources, dest = instruction.args.split()
                target = self.workdir / dest
                target.mkdir(parents=True, exist_ok=True)
                for source in sources:
                    (target / Path(source).name).write_bytes((REPO / source).read_bytes())

    def _mount_volumes(self) -> None:
        workdir = _image_workdir()
        for service in self.services.values():
            for mount in service.get("volumes", []):
                source, target, *_ = mount.split(":")
                local = self.volumes[source] if source in self.volumes else (REPO / source).resolve()
                if local in self.volumes.values():
                    local.mkdir(parents=True, exist_ok=True)
                if target.startswith(workdir + "/"):
                    link = self.workdir / target.removeprefix(workdir + "/")
                    if not link.is_symlink():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(local)
                    assert link.resolve() == local, f"{target} mounts two things"
                else:
                    assert self.mounts.setdefault(target, local) == local, f"{target} mounts two things"
        self.mounts[workdir] = self.workdir

    def _place_cluster_spec(self, container_path: str) -> None:
        """Replace the cluster spec a container would read by its loopback version: the list form,
        since a network alias resolving to several daemons has no loopback equivalent."""
        local = Path(self.remap(posixpath.join(_image_workdir(), container_path), None))
        lines = []
        for shard in ClusterSpec.from_file(local).shards:
            replicas = ", ".join(f'"{self.remap(r, None)}"' for r in shard.replicas)
            lines += ["[[shards]]", f'primary = "{self.remap(shard.primary, None)}"', f"replicas = [{replicas}]", ""]
        local.unlink()  # the link to the bind mount's source, which stays as it is
        local.write_text("\n".join(lines))

    def remap(self, text: str, service: str | None) -> str:
        """Container paths and addresses in `text` as this host sees them."""
        for target, local in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            text = re.sub(rf"(?<![\w./-]){re.escape(target)}(?![\w.-])", str(local), text)

        def address(match: re.Match[str]) -> str:
            host, port = match.group(1), int(match.group(2))
            name = service if host in ("127.0.0.1", "localhost") else host
            assert port == self._container_port[name], f"{match.group(0)}: {name} listens on another port"
            return f"127.0.0.1:{self.ports[name]}"

        hosts = "|".join(re.escape(h) for h in [*self._container_port, "127.0.0.1", "localhost"])
        return re.sub(rf"(?<![\w.-])({hosts}):(\d+)(?![\w.-])", address, text)

    def _argv(self, name: str) -> list[str]:
        argv = _argv(self.services[name])
        if "--advertise" in argv:  # its own address, not known before it listens
            del argv[argv.index("--advertise") : argv.index("--advertise") + 2]
        argv = [self.remap(word, name) for word in argv]
        if name in self._container_port:  # listen on a free loopback port and say which
            argv[argv.index("--listen") + 1] = "127.0.0.1:0"
            argv += ["--port-file", str(self.root / f"{name}.port")]
            # Containers never share a host: rows go over gRPC, not through mapped files, here too.
            argv.append("--no-same-host")
        return argv

    def start(self, name: str) -> None:
        if name == "etcd":  # ready when this returns
            self.etcd = EtcdServer(require_etcd(), self.volumes["etcd"]).start()
            self.ports[name] = self.etcd.client_port
            return
        argv = _argv(self.services[name])
        if "--cluster" in argv:  # the demo's
            self._place_cluster_spec(argv[argv.index("--cluster") + 1])
        self._logs.append((self.root / f"{name}.log").open("wb"))
        self.processes[name] = subprocess.Popen(
            self._argv(name), cwd=self.workdir, env=self.env, stdout=self._logs[-1], stderr=subprocess.STDOUT
        )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def wait_job(self, name: str, timeout_s: float) -> None:
        try:
            code = self.processes[name].wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still runs after {timeout_s} s:\n{self.log(name)}") from None
        assert code == 0, f"{name} exited with {code}:\n{self.log(name)}"
        self.done.add(name)

    def wait_healthy(self, name: str, timeout_s: float) -> None:
        """Run the service's healthcheck until it passes, as compose does."""
        if name == "etcd":  # started ready
            self.done.add(name)
            return
        deadline = time.monotonic() + timeout_s
        port_file = self.root / f"{name}.port"
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"{name} is not listening after {timeout_s} s:\n{self.log(name)}"
            time.sleep(0.05)
        self.ports[name] = int(port_file.read_text())
        check = [self.remap(word, name) for word in _healthcheck_argv(self.services[name])]
        while True:
            result = subprocess.run(check, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=60)
            if result.returncode == 0:
                self.done.add(name)
                return
            assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"{name} unhealthy after {timeout_s} s: {result.stderr}"
            time.sleep(0.2)

    def up(self, timeout_s: float = 120.0) -> None:
        """Start every service once its depends_on conditions hold, wave by wave."""
        while len(self.done) < len(self.services):
            wave = [
                name
                for name, service in self.services.items()
                if name not in self.processes
                and name not in self.ports
                and set(service.get("depends_on", {})) <= self.done
            ]
            assert wave, f"depends_on cannot be met: {sorted(set(self.services) - self.done)}"
            for name in wave:
                self.start(name)
            with ThreadPoolExecutor(len(wave)) as pool:  # a wave's daemons start side by side
                waits = [
                    pool.submit(
                        self.wait_healthy if "healthcheck" in self.services[name] else self.wait_job, name, timeout_s
                    )
                    for name in wave
                ]
                for wait in waits:
                    wait.result()

    def down(self, grace_s: float = 20.0) -> dict[str, int]:
        """Compose's stop: one SIGTERM to every process still running, SIGKILL after the grace
        period; the exit codes. (A second SIGTERM could end a daemon that is already draining.)"""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        codes = {name: process.returncode for name, process in self.processes.items()}
        for log in self._logs:
            log.close()
        if self.etcd is not None:  # last: the daemons leave it on their way out
            self.etcd.stop()
        return codes


@pytest.fixture
def local_compose(tmp_path: Path) -> Iterator[LocalCompose]:
    compose = LocalCompose(_compose(COMPOSE_ENV), tmp_path)
    try:
        yield compose
    finally:
        compose.down()


@pytest.mark.slow
def test_compose_services_run_as_local_processes(local_compose: LocalCompose) -> None:
    """table-init, then the four daemons (each once its healthcheck passes), then the demo:
    it trains and samples through the cluster, and every shard's replica follows its primary."""
    local_compose.up()

    config = replace(FAST_FAIL, same_host=False)
    daemons = _daemons(_compose())
    # Every daemon registered in etcd (the demo found them there), as the address it serves at.
    with EtcdClient(local_compose.etcd.endpoint) as etcd:
        members = [MemberRecord.decode(kv.value) for kv in etcd.get_prefix(members_prefix(CLUSTER_NAME))[0]]
    assert sorted(m.address for m in members) == sorted(f"127.0.0.1:{local_compose.ports[name]}" for name in daemons)
    for name, args in daemons.items():
        if args.follow is None:
            with MemstoreClient(f"127.0.0.1:{local_compose.ports[name]}", config) as primary:
                version = primary.version()
            # The demo's steps each pushed to every shard (an empty part included).
            assert version >= int(COMPOSE_ENV["DEMO_STEPS"]), f"{name} applied {version} pushes"
            (follower,) = _followers(daemons, name)
            with MemstoreClient(f"127.0.0.1:{local_compose.ports[follower]}", config) as replica:
                deadline = time.monotonic() + 10
                while replica.version() < version and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert replica.version() == version, f"{follower} did not catch up with {name}"

    codes = local_compose.down()
    assert codes == dict.fromkeys(local_compose.processes, 0), "every process exits 0 (daemons drain on SIGTERM)"

    # The next `up` runs the init job again: it keeps the trained tables.
    tables = [Path(local_compose.remap(str(args.path), name)) for name, args in daemons.items()]
    before = [path.stat().st_ino for path in tables]
    local_compose.start("table-init")
    local_compose.wait_job("table-init", timeout_s=60)
    assert [path.stat().st_ino for path in tables] == before
