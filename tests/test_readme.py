"""The README and docs/ stay true: a README short enough to be a product page, the two Quickstart
commands, a Limits section that fits on one screen, links that resolve, commands, install extras and
Makefile variables that exist, the generated support matrix, the integrator table against the
registry, and numbers that agree with the pages they link (tables against stored results:
test_docs_results.py)."""
import configparser
import importlib.util
import re
import shlex

import pytest

from edgevlm.export.support_matrix import markdown

from conftest import REPO
from docs_text import DOCS, MOVED, README, code_lines, numbers, pages, section, slug, table

README_MAX_LINES = 200


def test_readme_is_a_product_page():
    """Short, and what a newcomer looks for comes before any measurement."""
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md is over 200 lines; move detail to docs/"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    for first, then in (("Install", "Quickstart"), ("Quickstart", "Use it"), ("Use it", "Support matrix"),
                        ("Support matrix", "Headline numbers"), ("Headline numbers", "Limits")):
        assert headings.index(first) < headings.index(then), (first, then)


def test_support_matrix_in_docs_is_current():
    assert markdown() in (DOCS / "export.md").read_text(), \
        "docs/export.md: run python -m edgevlm.export.support_matrix --update docs/export.md"


def test_pytorch_only_integrators_named_in_readme():
    """The README's "run in PyTorch only" integrators are those every export target refuses."""
    pytest.importorskip("torch")
    from edgevlm.model.integrators import EXPORT_TARGETS, INTEGRATORS, export_refusal

    text = section(README.read_text(), "## Support matrix")
    named = re.search(r"live inside the LLM \(([^)]*)\)\s+run in PyTorch only", text).group(1)
    refused = {n for n in INTEGRATORS.names() if all(export_refusal(n, t) for t in EXPORT_TARGETS)}
    assert set(re.findall(r"`(\w+)`", named)) == refused


def test_quickstart_has_exactly_the_two_commands():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("```", 2)[1]
    commands = [l.split("#")[0].strip() for l in quick.splitlines()[1:] if l.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_limits_fit_on_one_screen():
    limits = section(README.read_text(), "## Limits").strip().splitlines()
    assert 0 < len(limits) <= 30, f"README's Limits section has {len(limits)} lines; move detail to docs/"


def test_readme_links_the_moved_research_logs():
    text = README.read_text()
    for name in MOVED:
        assert f"(docs/{name}" in text, f"README does not link docs/{name}"


def test_relative_links_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and an anchor names a
    heading of that page."""
    texts = pages()
    for page, text in texts.items():
        base = (REPO / page).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (base / path).resolve() if path else REPO / page
            assert file.exists(), f"{page} links {target}, which does not exist"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{page} links {target}: no such heading"


def test_commands_named_in_docs_exist():
    """Scripts run by path and modules run with -m exist, `edgevlm X` is a subcommand (in code blocks
    too), `make X` is a Makefile target and `make X VAR=...` sets a variable the Makefile reads."""
    from edgevlm.cli import COMMANDS

    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    for page, text in pages().items():
        for script in re.findall(r"python3? ((?:train|export|benchmarks)/[\w/]+\.py)", text):
            assert (REPO / script).exists(), f"{page}: {script} does not exist"
        for module in re.findall(r"python3? -m (edgevlm[\w.]*)", text):
            assert importlib.util.find_spec(module) is not None, f"{page}: no module {module}"
        blocks = "\n".join(code_lines(text))
        for cmd in re.findall(r"`edgevlm (\w+)", text) + re.findall(r"^edgevlm (\w+)", blocks, flags=re.M):
            assert cmd in COMMANDS, f"{page}: edgevlm {cmd} is not a subcommand"
        for target, assigns in re.findall(r"(?:`|^)make ([\w-]+)((?: [A-Z_]+=\S*)*)", text + "\n" + blocks, flags=re.M):
            assert target in targets, f"{page}: make {target} is not a Makefile target"
            for var in re.findall(r"([A-Z_]+)=", assigns):
                assert re.search(rf"^{var}\s*[?:]?=", makefile, flags=re.M), f"{page}: the Makefile has no {var}"


def test_environment_variables_named_in_docs_exist():
    """An `EDGEVLM_*` variable the README or docs/ tell a user to set is read by the code or the tests."""
    code = "\n".join(p.read_text() for folder in ("edgevlm", "runtime", "model", "train", "export", "benchmarks", "tests")
                     for p in (REPO / folder).rglob("*.py"))
    for page, text in pages().items():
        for var in set(re.findall(r"\bEDGEVLM_[A-Z_]+", text)):
            assert f'"{var}"' in code, f"{page} names {var}, which nothing reads"


def test_readme_edgevlm_commands_parse():
    """Every `edgevlm ...` line of the README's code blocks is accepted by the real CLI parser."""
    pytest.importorskip("torch")
    from edgevlm.cli import build_parser

    lines = [l.split("  #")[0] for l in code_lines(README.read_text()) if l.startswith("edgevlm ")]
    assert lines
    for line in lines:
        for command in line.split("&&"):
            argv = shlex.split(command)[1:]
            try:
                build_parser(argv[0]).parse_args(argv)
            except SystemExit:
                pytest.fail(f"README: `{command.strip()}` is refused by edgevlm's parser")


def test_install_extras_named_in_docs_exist():
    """Every extra the README and docs/ install (`pip install ".[ort]"`, edgevlm[serve], `[train]`)
    is one of setup.cfg's extras."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / "setup.cfg")
    extras = set(cfg["options.extras_require"])
    patterns = (r"edgevlm\[([\w,]+)\]", r"[\"']\.\[([\w,]+)\][\"']", r"`\[([\w,]+)\]`")
    for page, text in pages().items():
        named = {e for p in patterns for group in re.findall(p, text) for e in group.split(",")}
        assert named <= extras, f"{page} installs {sorted(named - extras)}, not extras of setup.cfg"


def test_integrator_table_matches_the_registry():
    """docs/models.md's integrator table: the registered integrators, their visual tokens, parameters at
    MobileVLM-1.7B widths and GGUF projector, as `edgevlm list integrators` computes them."""
    pytest.importorskip("torch")
    from edgevlm.train.listing import _fmt, integrator_rows

    rows = table(section((DOCS / "models.md").read_text(), "## Integrators"), "| integrator | structure |")
    shown = {r[0].strip("`"): r for r in rows}
    actual = {r["integrator"]: r for r in integrator_rows("mobilevlm-1.7b")}
    assert sorted(shown) == sorted(actual)
    for name, r in actual.items():
        _, _, tokens, params, gguf = shown[name]
        assert int(re.findall(r"\d+", tokens)[-1]) == r["visual_tokens"], name
        assert params.split()[0] == _fmt(r["params"]), name
        assert (gguf.split()[0].strip("`") if gguf != "-" else "-") == r["gguf"], name


@pytest.mark.parametrize("page, heading", [("README.md", "## Headline numbers"),
                                           ("docs/measurements.md", "## Measured numbers")])
def test_quoted_numbers_agree_with_their_pages(page, heading):
    """Each row of a numbers table names its command, and every number it quotes appears on the page
    its first link points to (outside this row), where a table checked against the stored results or
    the text beside the command holds it."""
    path = REPO / page
    text = path.read_text()
    rows = table(section(text, heading), "| what |")
    assert rows
    for what, number, command, details in rows:
        assert command.startswith("`"), f"{page}: {what}: no command"
        link = re.search(r"\]\(([^)#\s]*)(?:#[^)]*)?\)", details)
        assert link, f"{page}: {what}: no link to the details"
        linked = (path.parent / link.group(1)).resolve() if link.group(1) else path
        body = linked.read_text().replace(f"| {what} | {number} |", "")
        for n in numbers(number):
            assert n in body, f"{page}: {what}: {n} is not in {link.group(1) or page}"


def test_source_paths_named_in_docs_exist():
    """Files and folders of the repo that README.md and docs/ name (the architecture section's "where
    to add" included) exist, so a moved file shows here."""
    pattern = r"`((?:runtime|model|train|export|benchmarks|edgevlm|tests)/[\w./-]*)(?![\w<*{])"
    for page, text in pages().items():
        for path in re.findall(pattern, text):
            assert (REPO / path).exists(), f"{page} names {path}, which does not exist"
