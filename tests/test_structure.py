"""The code's shape: imports run one way (no circles), and inference loads no training code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("data2csv.py", "csv2json.py", "train.py", "infer.py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the latexocr modules it imports}, read from the source: every import statement,
    at module level or inside a function, absolute or relative."""
    files = sorted((ROOT / "latexocr").rglob("*.py")) + [ROOT / s for s in SCRIPTS]
    names = {_module_name(f) for f in files}
    graph = {}
    for f in files:
        me = _module_name(f)
        package = me if f.name == "__init__.py" else me.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import x` imports the submodule x, `from .m import f` the module m
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in names and t != me}
        graph[me] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_run_one_way():
    graph = import_graph()
    assert len(graph) > 15 and "latexocr.training" in graph["latexocr.fast.trainer"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_inference_loads_no_training_code(tmp_path, tiny_model_dir, formula_images):
    """infer.py, run to its printed result, never imports the Trainer or the training modules."""
    image = formula_images[0][0]
    code = (f"import runpy, sys; sys.argv = ['infer.py', {image!r}, '--model-id', {str(tiny_model_dir)!r}, "
            "'--model-source', 'local', '--adapter', 'none', '--num-workers', '0', '--max-new-tokens', '3']; "
            f"runpy.run_path({str(ROOT / 'infer.py')!r}, run_name='__main__'); "
            "print('LOADED', sorted(m for m in sys.modules if m.startswith(('transformers.trainer', "
            "'latexocr.training', 'latexocr.fast.plan', 'latexocr.fast.trainer', 'peft.tuners.lora.model'))"
            " and m != 'transformers.trainer_utils'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.rsplit("LOADED", 1)[1].strip()
    assert loaded.startswith("[") and "latexocr" not in loaded and "transformers.trainer'" not in loaded, loaded


# ---------------------------------------------------------------- the settings blocks
TUTORIAL_KNOBS = {"MODEL_ID", "TRAIN_JSON", "VAL_JSON", "OUTPUT_DIR", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT",
                  "EPOCHS", "LEARNING_RATE", "BATCH_SIZE", "SWANLAB_PROJECT", "EXPERIMENT_NAME"}


def _settings_of(script: str) -> list[str]:
    """The UPPER_CASE settings of a script's block, in order (read from the source, nothing run)."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    names = []
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id.isupper() and target.id != "SETTINGS":
            names.append(target.id)
        if isinstance(target, ast.Name) and target.id == "SETTINGS":
            break
    return names


def test_every_setting_says_what_it_does():
    from latexocr.cli import settings_help
    for script in SCRIPTS:
        settings = [n for n in _settings_of(script) if not n.startswith("DEFAULT_")]
        described = {k for k, v in settings_help(ROOT / script).items() if v.strip()}
        assert settings and not set(settings) - described, (script, set(settings) - described)


def test_train_py_opens_with_the_tutorials_knobs():
    settings = _settings_of("train.py")
    assert TUTORIAL_KNOBS <= set(settings[:15]), TUTORIAL_KNOBS - set(settings[:15])
    # GRPO's settings included, the block stays below the 48 entries it had before issue 29
    assert len(settings) < 48, len(settings)


# ---------------------------------------------------------------- private library contracts
LIBRARIES = ("transformers", "peft", "swanlab", "torch")


def private_uses(path: Path) -> set[str]:
    """What a module relies on of the libraries' private side, as the code writes it: imports of a
    `_`-prefixed name or module, or from inside a model's own module (transformers.models.*); a function
    assigned over an object's method (a patch); a `_`-prefixed attribute read from an object that is
    neither `self`, a module of another library nor an attribute this project sets itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    other_modules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names if a.name.split(".")[0] not in LIBRARIES}
    found, reads = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] in LIBRARIES:
            for alias in node.names:
                parts = [*node.module.split("."), alias.name]
                if any(p.startswith("_") for p in parts) or parts[1:2] == ["models"]:
                    found.add(".".join(parts))
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in LIBRARIES
                      and any(p.startswith("_") for p in a.name.split("."))}
        elif isinstance(node, ast.Assign):
            patched = isinstance(node.value, ast.Lambda) or (isinstance(node.value, ast.Name)
                                                             and node.value.id in functions)
            targets = [t for target in node.targets for t in getattr(target, "elts", [target])]
            found |= {ast.unparse(t) for t in targets if patched and isinstance(t, ast.Attribute)
                      and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))}
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", *other_modules))):
            reads.add(node)
    # attributes this module sets (`module._unpacked_forward = ...`) or methods it defines are its own
    own = functions | {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for target in n.targets
                       for t in getattr(target, "elts", [target]) if isinstance(t, ast.Attribute)}
    return found | {ast.unparse(node) for node in reads if node.attr not in own}


def test_private_library_contracts_outside_the_speed_door_are_in_the_drift_check():
    """Each one is named, file and name, by an entry of the drift check (latexocr/fast/upstream.py SOURCES)."""
    from latexocr.fast.upstream import SOURCES

    files = [f for f in sorted((ROOT / "latexocr").rglob("*.py")) if "fast" not in f.relative_to(ROOT).parts]
    found = {(f.name, name) for f in files + [ROOT / s for s in SCRIPTS] for name in private_uses(f)}
    smart_resize = "transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize"
    assert len(files) > 15 and ("sample.py", smart_resize) in found  # really scanned
    listed = [used_by for used_by, _ in SOURCES.values()]
    missing = {(file, name) for file, name in found
               if not any(file in text and name.rpartition(".")[2] in text for text in listed)}
    assert not missing, f"private library contracts not in latexocr/fast/upstream.py SOURCES: {missing}"


def test_private_use_finder_sees_imports_patches_and_reads(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom torch._dynamo import config\nfrom transformers.models.x.y import f\n"
                      "def g(): pass\nobj.forward = g\nos._exit(0)\nn = config._private\nself._mine = 1\n")
    assert private_uses(module) == {"torch._dynamo.config", "transformers.models.x.y.f", "obj.forward",
                                    "config._private"}
