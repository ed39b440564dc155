"""The documentation runs, every public function is documented, nothing genkit loads unpickles."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import genkit

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_api_doc_examples_run(tmp_path, monkeypatch):
    """Every python block of docs/api.md, in order, in one namespace, in a fresh folder."""
    blocks = python_blocks(API_DOC.read_text())
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"docs/api.md python block {i + 1} failed: {e!r}\n{block}") from e
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "export" / "ddpm" / "model_index.json").is_file()


def test_python_blocks_are_found():
    """The extractor is under test too: it must see a block and skip other languages."""
    text = "a\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def public_modules() -> list:
    names = [m.name for m in pkgutil.walk_packages(genkit.__path__, "genkit.") if not m.name.endswith("__main__")]
    return [importlib.import_module(n) for n in ["genkit", *names]]


def undocumented(module) -> list[str]:
    """Public functions, classes and their public methods/properties defined in `module` without a docstring."""
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not (obj.__doc__ or "").strip():
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if attr.startswith("_") or not inspect.isfunction(fn):
                    continue
                # an override of a documented base method (nn.Module.forward, ...) inherits its doc
                if not (inspect.getdoc(getattr(obj, attr)) or "").strip():
                    missing.append(f"{module.__name__}.{name}.{attr}")
    return missing


def test_every_public_function_has_a_docstring():
    missing = [m for module in public_modules() for m in undocumented(module)]
    assert not missing, f"{len(missing)} public functions without a docstring: {', '.join(missing)}"


def test_docstring_check_catches_a_missing_docstring():
    import types

    module = types.ModuleType("genkit.fake")
    exec("def documented():\n    'Yes.'\n\ndef bare():\n    pass\n\n"
         "class C:\n    'C.'\n    def m(self):\n        pass\n    @property\n    def p(self):\n        'P.'\n",
         module.__dict__)
    assert undocumented(module) == ["genkit.fake.bare", "genkit.fake.C.m"]


UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"weights_only\s*=\s*False"), "weights_only=False"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\bpickle\.(load|loads|Unpickler)\b"), "pickle loading"),
    (re.compile(r"\b(joblib|dill|cloudpickle)\.load"), "pickle-based loading"),
]


def unsafe_loads(text: str) -> list[str]:
    """Lines of code that could unpickle arbitrary objects."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        found += [f"{number}: {why}" for pattern, why in UNSAFE if pattern.search(code)]
    return found


def test_no_loader_in_genkit_unpickles_arbitrary_objects():
    problems = [f"{path.relative_to(ROOT)}:{p}" for path in sorted((ROOT / "genkit").rglob("*.py"))
                for p in unsafe_loads(path.read_text())]
    assert not problems, problems


@pytest.mark.parametrize("line,bad", [
    ("state = torch.load(path, map_location='cpu')", True),
    ("state = torch.load(path, map_location='cpu', weights_only=True)", False),
    ("np.load(f, allow_pickle=True)", True),
    ("np.load(f, allow_pickle=False)", False),
    ("obj = pickle.loads(blob)", True),
    ("# torch.load(path) in a comment", False),
])
def test_unsafe_load_scanner(line, bad):
    assert bool(unsafe_loads(line)) == bad


def test_python_m_genkit_version():
    out = subprocess.run([sys.executable, "-m", "genkit", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                     "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"genkit {genkit.__version__}"
