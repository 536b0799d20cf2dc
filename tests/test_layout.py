"""The shape of the code: imports run one way, and the client side loads no model libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

NODE_PACKAGES = ("encoder_node", "denoiser_node", "decoder_node")
MODEL_LIBRARIES = ("torch", "diffusers", "transformers")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["triptych", "protocol"])
def test_no_product_module_reaches_into_a_node_package(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in _imports(path) if name.split(".")[0] in NODE_PACKAGES)
        for path in (ROOT / package).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_protocol_imports_no_model_code():
    for path in (ROOT / "protocol").rglob("*.py"):
        heavy = sorted(n for n in _imports(path) if n.split(".")[0] in ("diffusers", "transformers", "triptych"))
        assert not heavy, f"{path.name} imports {heavy}"


def test_node_packages_start_only_through_their_entry_points():
    from triptych.nodes import ENTRY_POINTS, node_main

    assert sorted(ENTRY_POINTS) == ["decoder", "denoiser", "encoder"]
    for service in ENTRY_POINTS:
        assert callable(node_main(service))


@pytest.mark.parametrize(
    "statement",
    [
        "import triptych.client",
        "import triptych",
        "import triptych.cli",
        "import triptych.status",
        "import triptych.http",
        "import protocol.broker",
        "import protocol.broker_core",
    ],
)
def test_the_client_side_loads_no_model_libraries(statement):
    check = f"{statement}; import sys; print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_generate_help_loads_no_model_libraries():
    check = (
        "import sys, runpy\n"
        "sys.argv = ['triptych', 'generate', '--help']\n"
        "try:\n    runpy.run_module('triptych', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT)
    assert "--true-cfg" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr


def test_the_broker_forwards_tensors_without_torch():
    """A denoise job's embeddings pass through the broker as received bytes: no torch needed there."""
    script = """
import sys
from protocol import messages
from protocol.broker_core import BrokerCore
from protocol.messages import Embeddings, GenerateRequest, WorkerReady
from protocol.tensors import WireTensor
core = BrokerCore()
for service in ("encoder", "denoiser", "decoder"):
    core.handle(service.encode(), WorkerReady(service=service, model="m", node=service), 0.0)
core.handle(b"client", GenerateRequest(request_id="r", model="m", prompt="p", seed=1), 0.0)
(job,) = [m for _, m in core.outbox if m.KIND == "encode_job"]
embeds = {"prompt_embeds": WireTensor("bfloat16", (1, 4, 8), memoryview(bytes(range(64))))}
wire = messages.to_frames(Embeddings(job_id=job.job_id, embeds=embeds))
core.handle(b"encoder", messages.from_frames([bytes(f) for f in wire]), 0.1)
(denoise,) = [m for _, m in core.outbox if m.KIND == "denoise_job"]
frames = [bytes(f) for f in messages.to_frames(denoise)]
assert bytes(messages.from_frames(frames).embeds["prompt_embeds"].data) == bytes(range(64))
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def _base_distributions() -> set[str]:
    """The base install's distributions: pyproject's dependencies and everything they require."""
    import re
    from importlib import metadata

    import tomllib

    def name(requirement: str) -> str:
        return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [name(r) for r in project["dependencies"]]
    seen = {"triptych"}
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = metadata.distribution(dist).requires or []
        except metadata.PackageNotFoundError:  # a requirement for another platform
            continue
        todo.extend(name(r) for r in requires if "extra ==" not in r)
    return seen


def test_the_client_side_runs_on_the_base_install():
    """What `pip install triptych` (no "nodes" extra) gives is all the client, broker and gateway import."""
    modules = "triptych.client, triptych.cli, triptych.status, triptych.http, protocol.broker, protocol.metrics"
    script = (
        f"import sys, {modules}\n"
        "from importlib import metadata\n"
        "owners = metadata.packages_distributions()\n"
        "names = {m.split('.')[0] for m in list(sys.modules)}\n"
        "print(sorted({d.lower().replace('_', '-') for n in names for d in owners.get(n, [])}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    # setuptools: the site hook of an editable install; sniffio: anyio uses it when present.
    used = set(ast.literal_eval(result.stdout.strip())) - {"triptych", "setuptools", "sniffio"}
    assert used, result.stderr
    assert used <= _base_distributions(), f"not in the base install: {sorted(used - _base_distributions())}"
