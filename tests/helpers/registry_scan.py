"""What the Comfy Registry's scanner flags in a published zip, checked the same way here (ast for
Python, text for JS) so a finding shows up in the tests instead of in a flagged version.

The registry flags a version on findings of any severity; its reported rule names are subprocess or
`os.system` calls, network operations (in JS too: `.connect(`, `.bind(`), environment-variable
reads, `importlib.import_module`, database connections, and URL dependencies or custom wheels. Its
written policy adds: no eval or exec, no package installation at run time. `comfy node validate`
runs ruff's S102/S307 (exec, eval) on top.
"""

from __future__ import annotations

import ast
import re

# Modules whose import alone means one of the rules: processes (also how packages get installed at
# run time), network, databases, dynamic imports.
FLAGGED_MODULES = {
    "subprocess": "runs subprocesses",
    "multiprocessing": "runs subprocesses",
    "pty": "runs subprocesses",
    "socket": "opens network connections",
    "ssl": "opens network connections",
    "http.client": "opens network connections",
    "http.server": "opens network connections",
    "urllib.request": "opens network connections",
    "ftplib": "opens network connections",
    "smtplib": "opens network connections",
    "requests": "opens network connections",
    "httpx": "opens network connections",
    "aiohttp": "opens network connections",
    "websocket": "opens network connections",
    "websockets": "opens network connections",
    "huggingface_hub": "opens network connections (downloads)",
    "sqlite3": "connects to a database",
    "psycopg2": "connects to a database",
    "pymysql": "connects to a database",
    "pip": "installs packages",
    "ensurepip": "installs packages",
    "setuptools": "installs packages",
}
# Calls by dotted name.
FLAGGED_CALLS = {
    "eval": "evaluates strings (eval)",
    "exec": "evaluates strings (exec)",
    "compile": "evaluates strings (compile)",
    "__import__": "imports modules by name (__import__)",
    "os.system": "runs subprocesses (os.system)",
    "os.popen": "runs subprocesses (os.popen)",
    "os.getenv": "reads environment variables (os.getenv)",
    "os.putenv": "writes environment variables (os.putenv)",
    "os.getenvb": "reads environment variables (os.getenvb)",
    "importlib.import_module": "imports modules by name (importlib.import_module)",
    "torch.hub.load": "opens network connections (torch.hub)",
    "torch.hub.download_url_to_file": "opens network connections (torch.hub)",
}
FLAGGED_OS_PREFIXES = ("os.spawn", "os.exec", "os.fork", "os.posix_spawn")
FLAGGED_ATTRIBUTES = {
    "os.environ": "reads environment variables (os.environ)",
    "os.environb": "reads environment variables",
}
JS_FLAGGED = {
    r"\.connect\(": "network operation pattern `.connect(`",
    r"\.bind\(": "network operation pattern `.bind(`",
    r"\beval\(": "evaluates strings (eval)",
    r"\bnew\s+Function\(": "evaluates strings (new Function)",
    r"\bWebSocket\(": "opens network connections (WebSocket)",
}
URL_REQUIREMENT = re.compile(r"(://|\.whl\b|^\s*(git|hg|svn|bzr)\+|\s@\s)", re.IGNORECASE)


def _dotted(node: ast.AST) -> str | None:
    """'os.environ.get' for the expression os.environ.get; None when not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _module_rule(module: str) -> str | None:
    for flagged, why in FLAGGED_MODULES.items():
        if module == flagged or module.startswith(flagged + "."):
            return why
    return None


def scan_python(source: str, name: str) -> list[str]:
    """Findings in one Python file, each as 'name:line: what'. Import aliases are followed
    (`from os import environ`, `import subprocess as sp`), so renaming does not hide a call."""
    tree = ast.parse(source, filename=name)
    aliases: dict[str, str] = {}  # local name -> dotted origin
    findings = []

    def flag(node: ast.AST, why: str) -> None:
        findings.append(f"{name}:{node.lineno}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[(alias.asname or alias.name).split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
                if why := _module_rule(alias.name):
                    flag(node, f"imports {alias.name}: {why}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = full
                if why := _module_rule(node.module) or _module_rule(full):
                    flag(node, f"imports {full}: {why}")
                elif full in FLAGGED_CALLS or full in FLAGGED_ATTRIBUTES or full.startswith(FLAGGED_OS_PREFIXES):
                    flag(
                        node,
                        f"imports {full}: {FLAGGED_CALLS.get(full) or FLAGGED_ATTRIBUTES.get(full, 'runs subprocesses')}",
                    )

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            dotted = _dotted(node.func)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
            if resolved in FLAGGED_CALLS:
                flag(node, FLAGGED_CALLS[resolved])
            elif resolved.startswith(FLAGGED_OS_PREFIXES):
                flag(node, f"runs subprocesses ({resolved})")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
            for attribute, why in FLAGGED_ATTRIBUTES.items():
                if resolved == attribute:
                    flag(node, why)
    return sorted(set(findings))


def scan_javascript(source: str, name: str) -> list[str]:
    findings = []
    for number, line in enumerate(source.splitlines(), 1):
        code = line.split("//", 1)[0]
        findings += [f"{name}:{number}: {why}" for pattern, why in JS_FLAGGED.items() if re.search(pattern, code)]
    return findings


def scan_requirements(text: str, name: str) -> list[str]:
    """URL dependencies and custom wheels (the registry installs requirements.txt from PyPI)."""
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        requirement = line.split(" #", 1)[0].strip()
        if requirement and not requirement.startswith("#") and URL_REQUIREMENT.search(requirement):
            findings.append(f"{name}:{number}: URL dependency or custom wheel: {requirement}")
    return findings
