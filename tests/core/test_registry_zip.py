"""The Comfy Registry zip, built by comfy-cli's own function (`comfy node pack` and `comfy node publish`
call the same `zip_files`: git-tracked files minus .comfyignore, plus pyproject's [tool.comfy]
includes): it holds what runs in ComfyUI and nothing the registry's scanner flags
(tests/helpers/registry_scan.py); pyproject.toml carries what the registry records."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from helpers.registry_scan import scan_javascript, scan_python, scan_requirements
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # comfy-cli's pattern name
file_utils = pytest.importorskip("comfy_cli.file_utils", reason="comfy-cli (requirements-dev.txt) builds the zip")
config_parser = pytest.importorskip("comfy_cli.registry.config_parser")
if not (REPO / ".git").exists():  # `comfy node pack` zips the git-tracked files
    pytest.skip("not a git checkout", allow_module_level=True)

# What ComfyUI loads from the pack (__init__.py, its package, WEB_DIRECTORY, the templates) and the
# registry's page reads; anything else at the top of the zip is a developer's file that slipped in.
RUNTIME_TOP = {"__init__.py", "nodes", "mixture_core", "web", "workflows", "LICENSE", "README.md", "pyproject.toml",
               "requirements.txt"}  # fmt: skip
REQUIRED = {"__init__.py", "nodes/__init__.py", "nodes/extension.py", "mixture_core/__init__.py", "LICENSE",
            "README.md", "pyproject.toml", "requirements.txt"}  # fmt: skip
# First-party code that is not shipped: a shipped module importing it would fail in an installed pack.
DEV_PACKAGES = {"training", "bench", "quality", "workflows", "comfyui_host", "tests", "scripts", "helpers", "hostenv"}


def _tracked() -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.fixture(scope="module")
def config():
    return config_parser.extract_node_configuration(str(REPO / "pyproject.toml"))


@pytest.fixture(scope="module")
def shipped(config, tmp_path_factory) -> dict[str, bytes]:
    """{path: bytes} of the zip `comfy node pack` makes (it works in the current directory)."""
    target = tmp_path_factory.mktemp("registry") / "node.zip"
    before = os.getcwd()
    os.chdir(REPO)
    try:
        file_utils.zip_files(str(target), includes=config.tool_comfy.includes)
    finally:
        os.chdir(before)
    with zipfile.ZipFile(target) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def test_zip_holds_what_runs_in_comfyui(shipped):
    tracked = _tracked()
    templates = {p for p in tracked if PurePosixPath(p).parent.name == "workflows" and p.count("/") == 1}
    templates = {p for p in templates if p.endswith((".json", ".jpg"))}
    runtime = {p for p in tracked if p.split("/")[0] in {"nodes", "mixture_core", "web"}}
    assert any(p.endswith(".json") for p in templates) and any(p.endswith(".js") for p in runtime)
    missing = sorted((REQUIRED | templates | runtime) - set(shipped))
    assert not missing, f"left out of the registry zip: {missing}"


def test_zip_leaves_out_developer_files(shipped):
    stray = sorted(p for p in shipped if p.split("/")[0] not in RUNTIME_TOP)
    assert not stray, f"developer files in the registry zip (add them to .comfyignore): {stray}"
    # the template folder is listed non-recursively: only its .json graphs, .jpg cards and README are used
    extra = sorted(p for p in shipped if p.startswith("workflows/") and (p.count("/") > 1 or p.endswith(".py")))
    assert not extra, f"workflow build files or API twins in the registry zip: {extra}"


def _imported_files(module_path: str, tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """(line, import text, candidate zip paths) for each relative import of a shipped module."""
    package = PurePosixPath(module_path).parent
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = package
        for _ in range(node.level - 1):
            base = base.parent
        if node.module:
            module = base.joinpath(*node.module.split("."))
            candidates = [module.with_name(module.name + ".py"), module / "__init__.py"]
        else:  # `from . import x`: x is a submodule or a name defined in the package's __init__.py
            candidates = [base / "__init__.py", *(base / f"{alias.name}.py" for alias in node.names)]
        found.append((node.lineno, f"from {'.' * node.level}{node.module or ''}", [str(c) for c in candidates]))
    return found


def test_every_module_the_pack_imports_is_shipped(shipped):
    problems = []
    for path, data in shipped.items():
        if not path.endswith(".py"):
            continue
        tree = ast.parse(data, filename=path)
        for line, text, candidates in _imported_files(path, tree):
            if not any(c in shipped for c in candidates):
                problems.append(f"{path}:{line}: {text} is not in the zip (looked for {candidates})")
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            problems += [
                f"{path}:{node.lineno}: imports {n}, which is not shipped"
                for n in names
                if n.split(".")[0] in DEV_PACKAGES
            ]
    assert not problems, "\n".join(problems)


def test_shipped_files_pass_the_registry_scan(shipped, config):
    findings = []
    for path, data in sorted(shipped.items()):
        if path.endswith(".py"):
            findings += scan_python(data.decode(), path)
        elif path.endswith((".js", ".mjs")):
            findings += scan_javascript(data.decode(), path)
    findings += scan_requirements(shipped["requirements.txt"].decode(), "requirements.txt")
    findings += scan_requirements("\n".join(config.project.dependencies), "pyproject.toml dependencies")
    assert not findings, "the registry's scanner would flag:\n" + "\n".join(findings)


@pytest.mark.parametrize(
    "source, rule",
    [
        ("import subprocess\nsubprocess.run(['ls'])", "runs subprocesses"),
        ("from subprocess import check_call as c\nc(['pip', 'install', 'x'])", "runs subprocesses"),
        ("import os\nos.system('pip install x')", "os.system"),
        ("import os as o\no.execv('/bin/sh', [])", "os.execv"),
        ("import sys, runpy\nimport pip", "installs packages"),
        ("eval('1 + 1')", "eval"),
        ("exec('x = 1')", "exec"),
        ("import importlib\nm = importlib.import_module('x')", "importlib"),
        ("from importlib import import_module", "importlib"),
        ("__import__('os')", "__import__"),
        ("import os\nhome = os.environ.get('HOME')", "environment"),
        ("import os\nhome = os.getenv('HOME')", "environment"),
        ("from os import environ\nhome = environ['HOME']", "environment"),
        ("import urllib.request\nurllib.request.urlopen('http://x')", "network"),
        ("import socket", "network"),
        ("import requests", "network"),
        ("from huggingface_hub import hf_hub_download", "network"),
        ("import torch\ntorch.hub.load('a', 'b')", "torch.hub"),
        ("import sqlite3", "database"),
    ],
)
def test_the_scan_flags_each_rule(source, rule):
    findings = scan_python(source, "x.py")
    assert any(rule in f for f in findings), findings


def test_the_scan_passes_ordinary_code():
    source = (
        "import os\nimport re\nimport torch\nimport torch.nn.functional as F\nfrom pathlib import Path\n"
        "p = os.path.join('a', 'b')\nr = re.compile('x')\nm = torch.compile\nx = F.relu(torch.zeros(1))\n"
        "def f(env):\n    return env.get('x')\n"
    )
    assert scan_python(source, "ok.py") == []
    assert scan_javascript("app.registerExtension({ name: 'x' }); // .connect( in a comment", "ok.js") == []
    assert scan_javascript("node.connect(0, other, 0)", "bad.js")
    assert scan_requirements("einops>=0.7\n# a comment\nsafetensors>=0.4  # why", "r.txt") == []
    assert scan_requirements("pkg @ https://example.com/pkg.whl\ngit+https://github.com/a/b", "r.txt")


def test_comfy_node_validate_passes(capsys):
    """`comfy node validate` in-process: pyproject parses, and its ruff pass (exec, eval, `;`-joined
    statements, over the whole checkout; it only warns) finds nothing."""
    command = pytest.importorskip("comfy_cli.command.custom_nodes.command")
    before = os.getcwd()
    os.chdir(REPO)
    try:
        command.validate_node_for_publishing()
    finally:
        os.chdir(before)
    out = capsys.readouterr().out
    assert "All validation checks passed" in out and "Security warnings" not in out, out


def test_pyproject_has_what_the_registry_records(config):
    project, comfy = config.project, config.tool_comfy
    assert project.name and project.version and comfy.publisher_id
    # comfy-cli drops all OS (or all accelerator) entries when one is not a value it knows
    assert project.supported_os and project.supported_accelerators
    repository = project.urls.repository.rstrip("/")
    assert repository.startswith("https://github.com/")
    assert project.urls.documentation.startswith(repository) and project.urls.issues == f"{repository}/issues"
    # the Icon is a raw GitHub URL of an image in this repository: square, at most 400x400
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy.icon.startswith(raw), comfy.icon
    icon = comfy.icon.removeprefix(raw)
    assert icon in _tracked(), f"Icon {icon} is not a tracked file"
    with Image.open(io.BytesIO((REPO / icon).read_bytes())) as image:
        assert image.width == image.height <= 400, image.size
