"""The README and docs/ stay true: a README short enough to be a product page, the two Quickstart
commands, a Limits section that fits on one screen, links that resolve, commands, install extras and
Makefile variables that exist, the generated support matrix, and tables and numbers that match the
registry and the stored results they were measured from."""
import configparser
import importlib.util
import json
import re
import shlex

import pytest

from edgevlm.export.support_matrix import markdown

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
# the architecture, measurements, research logs and reference the README links instead of holding
MOVED = ("architecture.md", "export.md", "measurements.md", "perf-1.7b.md", "fidelity.md", "demo-model-study.md",
         "int8-portability.md", "integrator-study.md", "serving.md", "training.md", "models.md")
README_MAX_LINES = 200


def section(text: str, heading: str) -> str:
    """The body of the section that starts with ``heading`` (a full heading line), to the next
    heading of the same or a higher level."""
    level = heading.split()[0]
    body = text.split("\n" + heading + "\n", 1)[1]
    stop = re.search(rf"^#{{1,{len(level)}}} ", body, flags=re.M)
    return body[: stop.start()] if stop else body


def table(text: str, header_start: str) -> list[list[str]]:
    """Rows (cells stripped) of the markdown table whose header line starts with ``header_start``."""
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def pages() -> dict:
    """README.md and every docs page, by path relative to the repo."""
    out = {"README.md": README.read_text()}
    out.update({f"docs/{p.name}": p.read_text() for p in sorted(DOCS.glob("*.md"))})
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def close(shown: str, value: float) -> bool:
    """A number as printed (rounded to its decimals, thousands commas allowed) is ``value``."""
    digits = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown.replace(",", "")) - value) <= 0.5 * 10 ** -digits + 1e-9


def code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks of a Markdown page."""
    blocks = text.split("```")[1::2]
    return [line.strip() for block in blocks for line in block.splitlines()[1:]]


def numbers(cell: str) -> list[str]:
    """The numbers written in a table cell (``3,051``, ``0.0018``, ``4.32`` of ``4.32x``), not digits
    inside names such as ``q4_k_m``, ``int8`` or ``i7``."""
    return [n.rstrip(",") for n in re.findall(r"(?<![A-Za-wyz_.\d])\d[\d,]*(?:\.\d+)?", cell)]


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


def test_int8_table_matches_stored_results():
    """docs/int8-portability.md's format table is benchmarks/int8_formats.py's output on the VNNI host
    and under qemu -cpu Haswell (AVX2), as stored in benchmarks/results/int8/."""
    host = json.loads((RESULTS / "int8" / "tiny_x86-vnni.json").read_text())["formats"]
    avx2 = json.loads((RESULTS / "int8" / "tiny_avx2-qemu.json").read_text())["formats"]
    rows = table((DOCS / "int8-portability.md").read_text(), "| `--int8-target` |")
    assert sorted(r[0].split()[0].strip("`") for r in rows) == sorted(host)
    for r in rows:
        fmt = r[0].split()[0].strip("`")
        for cell, graph in ((r[3], "vision_encoder_rel_l2"), (r[4], "decoder_rel_l2")):
            on_host, on_avx2 = (v.strip().strip("*") for v in cell.split("/"))
            assert close(on_host, host[fmt][graph]), (fmt, graph, on_host)
            assert close(on_avx2, avx2[fmt][graph]), (fmt, graph, on_avx2)
        # the decoder against its integer twin (the export's kernel check), measured on the VNNI host
        on_host = r[5].split("/")[0].strip()
        assert close(on_host, host[fmt]["decoder_vs_twin_rel_l2"]), (fmt, on_host)


def _check_table_matches_manifest(variant: str, heading: str) -> dict:
    """The "check on the <variant> decoder" table under ``heading`` is the stored 1.7B manifest's
    decoder validation (vs fp32, twin vs fp32, vs the twin, worst weight). Returns target_info."""
    info = json.loads((RESULTS / f"{variant}-1.7b" / "manifest.json").read_text())["target_info"]
    check = info["graphs"]["decoder"]["validation"]
    text = section((DOCS / "int8-portability.md").read_text(), heading)
    values = [r[1] for r in table(text, f"| check on the {variant} decoder |")]
    expected = [check["max_rel_l2_all_outputs"], check["dequantized_vs_fp32_rel_l2"],
                check["kernels"]["max_rel_l2"], check["weights"]["max"]]
    assert len(values) == len(expected)
    for shown, value in zip(values, expected):
        assert close(shown, value), (shown, value)
    assert f"({check['weights']['n_matrices']} matrices" in text
    return info


def test_int8_check_numbers_match_stored_manifest():
    _check_table_matches_manifest("int8", "## How quantised decoders are checked")


def test_int4_numbers_match_stored_manifest():
    """docs/int8-portability.md's int4-at-1.7B table and token check are the stored export manifest's."""
    info = _check_table_matches_manifest("int4", "## int4 at MobileVLM-1.7B shape")
    text = section((DOCS / "int8-portability.md").read_text(), "## int4 at MobileVLM-1.7B shape")
    tc = info["token_check"]
    for phrase, value in (("mean ", tc["kl_mean"]), ("same top token ", tc["same_top_token"])):
        shown = re.search(re.escape(phrase) + r"([\d.]+)", text).group(1)
        assert close(shown, value), (phrase, shown, value)


def test_integrator_study_excerpt_matches_stored_study():
    """docs/integrator-study.md's excerpt is benchmarks/results/integrators/study.json: accuracy
    overall / colour / count and median TTFT at MobileVLM-1.7B shape."""
    study = json.loads((RESULTS / "integrators" / "study.json").read_text())
    acc = {r["integrator"]: r for r in study["integrators"]}
    ttft = {c["integrator"]: c["metrics"]["ttft_ms"]["median"] for c in study["latency"]
            if c.get("type") == "case" and "ttft_ms" in c.get("metrics", {})}
    rows = table((DOCS / "integrator-study.md").read_text(), "| integrator | tokens |")
    names_seen = []
    for r in rows:
        names = re.findall(r"`(\w+)`", r[0])
        names_seen += names
        cells = [[v.strip() for v in c.split("/")] for c in r[1:]]
        for i, name in enumerate(names):
            pick = [c[i] if len(c) > 1 else c[0] for c in cells]
            e = acc[name]["eval"]
            assert int(pick[0]) == acc[name]["n_visual_tokens_1p7b"], name
            assert close(pick[1], e["overall"]["accuracy"]), (name, "overall")
            assert close(pick[2], e["per_type"]["colour"]["accuracy"]), (name, "colour")
            assert close(pick[3], e["per_type"]["count"]["accuracy"]), (name, "count")
            assert close(pick[4], ttft[name]), (name, "ttft")
    assert sorted(names_seen) == sorted(acc)


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


def test_hugging_face_baseline_per_run_matches_stored_results():
    """docs/measurements.md's one-baseline-per-run table: each run's Hugging Face eager TTFT and decode
    medians and its commit are the stored JSONL's."""
    rows = table((DOCS / "measurements.md").read_text(), "| run | results file | commit |")
    assert len(rows) >= 3
    for run, results, commit, ttft, decode in rows:
        records = _stored(results.strip("`").removeprefix("benchmarks/results/"))
        hf = [r for r in records if (r.get("backend"), r.get("integrator"), r.get("status")) == ("hf_eager", "ldp", "ok")][-1]
        assert int(ttft.replace(",", "")) == round(hf["metrics"]["ttft_ms"]["median"]), run
        assert close(decode, hf["metrics"]["decode_tok_s"]["median"]), run
        commits = [r["git"]["commit"] for r in records if r.get("type") == "environment"]
        assert commits[0].startswith(commit), (run, commits[0])


def test_source_paths_named_in_docs_exist():
    """Files and folders of the repo that README.md and docs/ name (the architecture section's "where
    to add" included) exist, so a moved file shows here."""
    pattern = r"`((?:runtime|model|train|export|benchmarks|edgevlm|tests)/[\w./-]*)(?![\w<*{])"
    for page, text in pages().items():
        for path in re.findall(pattern, text):
            assert (REPO / path).exists(), f"{page} names {path}, which does not exist"


def _stored(run: str) -> list[dict]:
    """The records of a committed results file (strict: a torn line fails the test)."""
    return [json.loads(line) for line in (RESULTS / run).read_text().splitlines()]


def _median(records: list[dict], backend: str, precision: str, metric: str) -> float:
    rec = [r for r in records if (r.get("backend"), r.get("precision"), r.get("status")) == (backend, precision, "ok")][-1]
    return rec["metrics"][metric]["median"]


PERF_HEAD = "| case | TTFT ms | vision ms | prefill ms | decode tok/s | "


@pytest.mark.parametrize("run, header, min_rows", [
    ("quant/quant.jsonl", PERF_HEAD + "fraction", 5),
    ("ttft/ttft.jsonl", PERF_HEAD + "TTFT vs Hugging Face | decode vs", 5),
    ("ttft/int8_rerun.jsonl", PERF_HEAD + "TTFT vs Hugging Face | fraction", 3)])
def test_perf_tables_match_stored_results(run, header, min_rows):
    """docs/perf-1.7b.md's tables are the committed benchmark runs' medians (TTFT, vision, prefill in
    ms; decode tok/s to 3 figures)."""
    records = _stored(run)
    rows = table((DOCS / "perf-1.7b.md").read_text(), header)
    assert len(rows) >= min_rows
    for label, ttft, vision, prefill, decode, *_ in rows:
        backend, precision = re.search(r"(Hugging Face|raw llama.cpp|`\w+`) ([\w-]+)", label).groups()
        backend = {"Hugging Face": "hf_eager", "raw llama.cpp": "llamacpp_raw"}.get(backend, backend.strip("`"))
        precision = "fp32" if backend == "hf_eager" else precision
        for cell, metric in ((ttft, "ttft_ms"), (vision, "vision_ms"), (prefill, "prefill_ms")):
            assert int(cell.replace(",", "")) == round(_median(records, backend, precision, metric)), (label, metric)
        assert float(decode) == float(f"{_median(records, backend, precision, 'decode_tok_s'):.3g}"), label


# docs/perf-1.7b.md's integrators table: column header -> (backend, precision, metric)
INTEGRATOR_COLUMNS = {
    "integrator ms (torch)": ("torch", "fp32", "integrator_ms"),
    "torch fp32 TTFT ms": ("torch", "fp32", "ttft_ms"),
    "Hugging Face TTFT ms": ("hf_eager", "fp32", "ttft_ms"),
    "`ort` int4 TTFT ms": ("ort", "int4", "ttft_ms"),
    "`llamacpp` q4_k_m TTFT ms": ("llamacpp", "q4_k_m", "ttft_ms"),
    "`ort` int4 decode tok/s": ("ort", "int4", "decode_tok_s"),
    "`llamacpp` q4_k_m decode tok/s": ("llamacpp", "q4_k_m", "decode_tok_s"),
    "raw llama.cpp decode tok/s": ("llamacpp_raw", "q4_k_m", "decode_tok_s"),
}


def test_integrators_table_matches_stored_results():
    """The integrators table is the committed `integrators` run: every number is that case's median
    (ms to the unit, rates and the integrator's ms to 3 figures), the visual token count is the
    case's, "cannot export" is a case the matrix skipped for its integrator, and "not run" a case
    with no result, "failed" a case recorded as failed."""
    by_case = {(r["integrator"], r["backend"], r["precision"]): r
               for r in _stored("integrators/integrators.jsonl") if r.get("type") == "case"}
    text = (DOCS / "perf-1.7b.md").read_text()
    header = "| integrator | visual tokens | "
    columns = [c.strip() for c in text[text.index(header):].splitlines()[0].strip().strip("|").split("|")]
    assert set(columns[2:]) == set(INTEGRATOR_COLUMNS)
    rows = table(text, header)
    assert len(rows) == 12
    for integrator, n_visual, *cells in rows:
        integrator = integrator.strip("`")
        assert int(n_visual) == by_case[(integrator, "torch", "fp32")]["n_visual_tokens"], integrator
        for column, cell in zip(columns[2:], cells):
            backend, precision, metric = INTEGRATOR_COLUMNS[column]
            rec = by_case.get((integrator, backend, precision))
            where = (integrator, column)
            if cell == "cannot export":
                assert rec["status"] == "skipped" and "cannot be exported" in rec["reason"], where
            elif cell == "failed":
                assert rec["status"] == "failed", where
            elif cell == "not run":
                assert rec is None or rec["status"] != "ok", where
            else:
                value = rec["metrics"][metric]["median"]
                expected = f"{value:.3g}" if metric != "ttft_ms" else f"{round(value):,}"
                assert cell == expected, where
