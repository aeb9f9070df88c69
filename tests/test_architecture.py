"""docs/ARCHITECTURE.md's rules, checked against the code: the layers import only downwards, no import cycle,
no module over the size limit, nothing found through ``__file__``, the lab registers its kinds only in its scope,
``import bnzoo`` loads no Lightning, and an installed wheel works outside the repository."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bnzoo"

#: the layer of each top-level part of bnzoo (docs/ARCHITECTURE.md, "Layers")
LAYERS: dict[str, int] = {
    "registry": 0, "checks": 0, "io": 0, "resources": 0,
    "norms": 1, "models": 2, "zoo": 3,
    "data": 4, "tasks": 4, "callbacks": 4, "plugins": 4, "checkpoint_io": 4, "optim": 4,
    "cli": 5,
}  # fmt: skip
MAX_LINES = 375


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every bnzoo module ``path`` imports, at the top or inside functions."""
    module, found = _module(path), set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in ("bnzoo", "bnzoo_lab")}
    return found


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_part_of_bnzoo_has_a_layer() -> None:
    parts = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert parts - {"_resources"} <= set(LAYERS), sorted(parts - set(LAYERS))


def test_layers_import_only_downwards_and_never_the_lab() -> None:
    wrong = []
    for module, path in MODULES.items():
        mine = _layer(module)
        for name in _imports(path):
            assert not name.startswith("bnzoo_lab"), f"{module} imports the lab ({name})"
            target = _resolve(name)
            theirs = _layer(target) if target else None
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules() -> None:
    graph = {m: {t for n in _imports(p) if (t := _resolve(n)) and t != m and t in MODULES} for m, p in MODULES.items()}
    # a package's __init__ re-exports its modules: an edge into a package's own children is not a cycle
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_is_too_long_and_nothing_is_found_through_file_parents() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
    parents = [m for m, p in MODULES.items() if "__file__).resolve().parents" in p.read_text()]
    assert not parents, parents


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd="/", env={**os.environ, **env}, timeout=300)  # fmt: skip


def test_import_bnzoo_loads_no_lightning_and_no_lab_kinds() -> None:
    result = _run("""
        import sys, bnzoo
        assert not [m for m in sys.modules if m.startswith("lightning")], "lightning imported"
        import bnzoo_lab
        assert "noisy_bn" not in bnzoo.list_norms() and "input_norm_mlp" not in bnzoo.list_models()
        print("ok")
    """)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_an_installed_wheel_works_outside_the_repository(tmp_path: Path) -> None:
    """Build a wheel, install it (no dependencies: they come from this environment) into a fresh virtual
    environment, and run the commands a user meets first from a folder outside the checkout."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "dist"),
    ]
    built = subprocess.run([*command, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bnzoo-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")  # torch, Lightning, ... from this environment
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    python = venv / "bin" / "python"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BNZOO_CHECKPOINT_DIR")}

    def bnzoo(*args: str) -> str:
        run = subprocess.run([str(python), "-m", "bnzoo.cli", *args], cwd=work, env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, (args, run.stdout[-2000:], run.stderr[-3000:])
        return run.stdout

    where = subprocess.run([str(python), "-c", "import bnzoo; print(bnzoo.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    assert str(site) in where and str(ROOT) not in where, where
    helped = bnzoo("--help")
    for name in ("fit", "validate", "test", "predict", "recalibrate", "export", "pretrained", "experiment"):
        assert f"  {name} " in helped, helped
    listed = bnzoo("pretrained", "list")
    import json

    for entry in json.loads((ROOT / "checkpoints" / "index.json").read_text())["checkpoints"]:
        assert entry["name"] in listed
    bnzoo("pretrained", "verify")
    experiments = bnzoo("experiment", "list")
    assert len([p for p in (ROOT / "configs" / "experiments").iterdir() if p.is_dir()]) <= len(experiments.splitlines())
    config = Path(str(site)) / "bnzoo" / "_resources" / "configs" / "digits" / "mlp.yaml"
    assert config.is_file(), "the configs are package data"
    bnzoo("fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
          "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert list(work.glob("runs/*/version_0/checkpoints/last.ckpt")), sorted(map(str, work.rglob("*")))[:20]
