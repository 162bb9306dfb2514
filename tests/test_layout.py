"""The tree's rule: Ray is imported only in `spinml_ray/ray_layer/`, so everything else runs without it."""

import ast
import pathlib

import spinml_ray

PACKAGE = pathlib.Path(spinml_ray.__file__).parent
RAY_LAYER = PACKAGE / "ray_layer"


def ray_imports(path: pathlib.Path) -> list[int]:
    """Line numbers of `import ray...` / `from ray... import` anywhere in the file (functions included)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        if any(name == "ray" or name.startswith("ray.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_the_ray_layer_imports_ray():
    outside = {str(p.relative_to(PACKAGE)): found for p in PACKAGE.rglob("*.py")
               if RAY_LAYER not in p.parents and (found := ray_imports(p))}
    assert outside == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ray import serve\n    import ray.train\nfrom spinml_ray import ray_layer\n")
    assert ray_imports(source) == [2, 3]
    assert any(ray_imports(p) for p in RAY_LAYER.glob("*.py"))  # the layer itself is where Ray is used


def test_the_pure_modules_import_without_ray(tmp_path):
    """In a fresh interpreter where `import ray` fails, every module outside the layer still imports."""
    import subprocess
    import sys

    modules = sorted(".".join(("spinml_ray", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py") if RAY_LAYER not in p.parents)
    blocker = tmp_path / "ray.py"
    blocker.write_text("raise ImportError('ray is not available here')\n")
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % modules
    result = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ,
                            "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
