"""The README's usage example runs as written."""

from helpers import ROOT, readme_python_blocks


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write checkpoints to the working directory
    blocks = readme_python_blocks()
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q' \
        in (ROOT / "README.md").read_text()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci
    assert ci.rstrip().endswith("python -m pytest -q")
