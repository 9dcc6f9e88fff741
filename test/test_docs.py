"""The README's parameter tables are generated from the nodes' ParamSpec lists and must match
them; the README keeps the two commands that CI and users run."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _param_tables():
    spec = importlib.util.spec_from_file_location("param_tables", ROOT / "scripts" / "param_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_parameter_tables_are_current():
    readme = (ROOT / "README.md").read_text()
    assert _param_tables().updated(readme) == readme, \
        "README parameter tables are stale: run `python scripts/param_tables.py --update README.md`"


def test_readme_has_the_two_commands_and_ci_uses_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/run.sh demo" in readme and "bash scripts/run.sh test" in readme
    assert "bash scripts/run.sh test" in (ROOT / ".ci" / "run").read_text()


def test_every_benchmark_says_what_it_measures_and_ends_with_json():
    """Each script in benchmarks/ compiles, has a docstring naming what it measures, prints one
    JSON object (json.dumps) as its figures, and is listed in the README's performance table or
    docs (so none is orphaned)."""
    import ast

    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert scripts
    for path in scripts:
        src = path.read_text()
        tree = ast.parse(src, filename=str(path))
        doc = ast.get_docstring(tree) or ""
        assert len(doc.split()) >= 15, f"{path.name}: docstring must say what it measures and prints"
        assert "json.dumps(" in src, f"{path.name}: must print its figures as one JSON object"
        assert path.name in docs, f"{path.name} is not mentioned in README.md or docs/"
