"""The README stays true: its support matrix is the generated one, its Quickstart has the two commands."""
from edgevlm.export.support_matrix import markdown

from conftest import REPO


def test_support_matrix_in_readme_is_current():
    assert markdown() in (REPO / "README.md").read_text()


def test_quickstart_has_exactly_the_two_commands():
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("```", 2)[1]
    commands = [l.split("#")[0].strip() for l in quick.splitlines()[1:] if l.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
