"""The shape of the code: import graph, scripts, packaging and a quiet start."""

import ast
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import common
import console

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Library modules that also offer a small command line; they may be imported like any library.
LIBRARIES_WITH_A_COMMAND = {"prep_data", "similarity", "measure_sb_cut.validate"}


def project_modules():
    """Module name -> path of every Python file of the project outside tests/."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in {"tests", ".venv", "build"} or relative.parts[0].startswith("."):
            continue
        name = ".".join(relative.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(path, name, modules):
    """Project modules that ``path`` imports anywhere (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parent, base]))
            # ``from data import tidal`` imports the module data.tidal, not just the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def is_script(path):
    return bool(re.search(r'^if __name__ == "__main__":', path.read_text(), re.MULTILINE))


MODULES = project_modules()
GRAPH = {name: imports_of(path, name, MODULES) for name, path in MODULES.items()}


def test_no_import_cycle():
    # Depth-first search that reports the first cycle it meets, as a path.
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[name] = "done"
        stack.pop()
        return None

    for name in sorted(GRAPH):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_script():
    scripts = {name for name, path in MODULES.items() if is_script(path)} - LIBRARIES_WITH_A_COMMAND
    offenders = [f"{name} imports {target}" for name, targets in GRAPH.items() for target in sorted(targets & scripts)]
    assert not offenders, offenders


def test_the_import_graph_sees_known_edges():
    # The checks above are only as good as the graph: it must see plain, from- and function-level imports.
    assert "prep_data" in GRAPH["tidal_data"]
    assert "data.files" in GRAPH["tidal_data"]
    assert "measure_sb_cut.measure" in GRAPH["measure_sb_cut.__main__"]
    assert is_script(MODULES["train"]) and not is_script(MODULES["model"])


def test_pyproject_installs_every_module_and_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {name for name, path in MODULES.items() if path.parent == ROOT}
    assert set(project["tool"]["setuptools"]["py-modules"]) == top_level
    assert set(project["tool"]["setuptools"]["packages"]) == {"data", "measure_sb_cut"}
    scripts = project["project"]["scripts"]
    assert set(scripts) == set(console.COMMANDS)
    for command, target in scripts.items():
        module_name, function_name = target.split(":")
        assert module_name == "console" and callable(getattr(console, function_name))
        script_module, _ = console.COMMANDS[command]
        assert script_module in MODULES and is_script(MODULES[script_module])


def test_one_version_everywhere():
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf'^version: "{re.escape(common.__version__)}"$', citation, re.MULTILINE)
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    assert 'license: BSD-3-Clause' in citation


def test_no_pyplot_or_backend_switch_outside_notebooks():
    offenders = [str(path.relative_to(ROOT)) for path in MODULES.values()
                 if re.search(r"matplotlib\.use\(|import matplotlib\.pyplot|from matplotlib import pyplot", path.read_text())]
    assert not offenders, offenders


@pytest.mark.parametrize("command", ["icl-train", "icl-predict", "tidal-train"])
def test_first_command_prints_only_its_own_lines(command):
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("TF_", "ABSL_", "GRPC_"))}
    code = f"import sys, console; sys.exit(console.run({command!r}, ['--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ")
    assert result.stderr == ""


def test_verbose_keeps_tensorflow_messages():
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("TF_", "ABSL_", "GRPC_"))}
    assert common.quiet_start(["--verbose"], tensorflow=False) is False
    code = "import common; common.quiet_start(['x'], tensorflow=False); import os; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=environment)
    assert result.stdout.strip() == "3"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), common.atomic_write(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]
    common.write_json(target, {"n": 1})
    # Keras picks the format from the name, so the temporary name keeps the suffixes.
    assert common.atomic_path("runs/best.weights.h5").name == f".best.partial-{os.getpid()}.weights.h5"
    assert target.read_text() == '{\n  "n": 1\n}'


def test_output_paths_are_checked_before_work(tmp_path):
    assert common.check_output_file(tmp_path / "new" / "out.csv") == tmp_path / "new" / "out.csv"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(ValueError, match="--out .*: is a folder, not a file"):
        common.check_output_file(tmp_path)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ValueError, match="--plot-dir .*plain: exists and is not a folder"):
        common.check_output_dir(tmp_path / "plain", "--plot-dir")
    with pytest.raises(ValueError, match="--out .*plain: exists and is not a folder"):
        common.check_output_file(tmp_path / "plain" / "out.csv")
