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
    # room for the GRPO settings: the block stays well below the 48 entries it once had
    assert len(settings) <= 39, len(settings)
