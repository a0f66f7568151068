"""Docs kept true: the recipe reference equals the generated one; README and CI agree."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT


def test_recipe_reference_is_current(fresh_manager):
    from ftk.docgen import recipe_reference

    current = (ROOT / "docs" / "recipe.md").read_text()
    assert current == recipe_reference(fresh_manager), "regenerate: ftk schema --markdown > docs/recipe.md"


def test_readme_starts_with_the_two_commands_and_ci_runs_both():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    cmds = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
    assert len(cmds) == 2
    assert "ftk run examples/quickstart.json" in cmds[0]
    # command 1 installs as a user would: not editable, no extras, a venv of its own
    assert " -e " not in cmds[0] and "[" not in cmds[0] and "pip install -q torch==2.13.0 . " in cmds[0]
    assert ".venv/" not in cmds[0]
    assert "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    check = ".venv-user/bin/python .ci/check_quickstart.py examples/runs/quickstart/metrics.json"
    assert -1 < ci.find(cmds[0]) < ci.find(check) < ci.find(cmds[1])
    assert ci.rstrip().endswith("\n" + cmds[1])  # the test suite runs last: pytest's summary closes CI's output
    assert readme.index("```bash") < 200  # the commands come first


def test_ci_quickstart_check_passes_only_when_perplexity_went_down(tmp_path):
    def check(metrics) -> subprocess.CompletedProcess:
        f = tmp_path / "metrics.json"
        f.write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
        return subprocess.run([sys.executable, str(ROOT / ".ci" / "check_quickstart.py"), str(f)],
                              capture_output=True, text=True)

    p = check({"base": {"perplexity": 49.47}, "finetuned": {"perplexity": 45.22}})
    assert p.returncode == 0 and "base 49.4700, fine-tuned 45.2200" in p.stdout
    for tuned in (49.47, 50.0, "NaN"):
        p = check(f'{{"base": {{"perplexity": 49.47}}, "finetuned": {{"perplexity": {tuned}}}}}')
        assert p.returncode == 1 and p.stdout.splitlines()[-1].startswith("quickstart check FAILED: fine-tuned")
    p = check({"base": {"perplexity": 49.47}})
    assert p.returncode == 1 and p.stdout.startswith("quickstart check FAILED: no base and fine-tuned perplexity")


def test_docs_pages_linked_from_readme_exist():
    readme = (ROOT / "README.md").read_text()
    for page in re.findall(r"`(docs/[\w\-/]+\.md)`", readme):
        assert (ROOT / page).exists(), page


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's notebook example, run as written (from the project root, output in tmp)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('output_dir="runs/notebook"', f'output_dir={str(tmp_path / "nb")!r}')
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    res = ns["trainer"].evaluate()
    assert res["finetuned"]["perplexity"] > 0 and "base" in res
    assert (tmp_path / "nb" / "adapter" / "adapter_config.json").is_file()


def test_every_command_is_in_the_cli_reference():
    import click

    from ftk.cli import _build

    cli = _build()
    text = (ROOT / "docs" / "cli.md").read_text()
    for name, cmd in cli.commands.items():
        subs = cmd.commands if isinstance(cmd, click.Group) else {"": cmd}
        for sub in subs:
            assert f"`ftk {name}{' ' + sub if sub else ''}" in text, (name, sub)
