"""The docs: the site builds with warnings as errors, the references are generated and complete,
every result file names a command that exists, and the README stays short and current.

(The README's and the pages' code blocks run in ``test_docs_code.py``.)
"""
import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "gen"))

import command_reference  # noqa: E402
import config_reference  # noqa: E402
import readme  # noqa: E402
import results_tables  # noqa: E402

RESULTS = REPO / "results"


def console_scripts():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return {line.split("=")[0].strip() for line in lines}


# ----------------------------------------------------------------------------- the site
def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, a page missing from the navigation,
    a missing result file or a docstring mkdocstrings cannot render fails the build."""
    pytest.importorskip("mkdocs", reason="the [dev] extra installs mkdocs")
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    pages = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")}
    assert {"configuration", "commands", "api", "getting-started", "benchmarks"} <= pages
    html = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "MODEL.NFORMER.TOPK" in html and "(no comment)" not in html


# ----------------------------------------------------------------------------- references
def test_every_plugin_key_has_a_comment():
    """The configuration reference is the keys' own comments: a key without one is an error."""
    assert config_reference.missing_comments() == []


def test_configuration_reference_lists_every_key_with_its_default():
    from yacs.config import CfgNode

    from nformer_plugin.config import add_plugin_config

    keys = {k: v for k, v in config_reference.leaves(add_plugin_config(CfgNode())).items()
            if not config_reference.is_old_name(k)}  # renamed keys: listed as renames
    listed = {key: value for wing in config_reference.wings() for key, value, _ in wing["rows"]}
    assert set(keys) <= set(listed)
    assert all(listed[k] == v for k, v in keys.items())
    text = config_reference.markdown()
    assert all(f"`{key}`" in text for key in keys)


def test_the_comment_reader_finds_trailing_and_preceding_comments(tmp_path):
    source = tmp_path / "wing.py"
    source.write_text("def add(cfg):\n    _C = cfg\n    _C.A.B = 1  # the trailing one\n"
                      "    # the block\n    # above\n    _C.A.C = 2\n    _C.A.D = 3\n"
                      "    cfg.A.B = 4\n")
    found = config_reference.source_comments(str(source))
    assert found == {"A.B": "the trailing one", "A.C": "the block above", "A.D": ""}


def test_command_reference_covers_every_subcommand():
    from nformer_plugin.cli.main import build_parser

    names = [name for name, _ in command_reference.walk(build_parser())]
    assert {"nformer train", "nformer index", "nformer index build", "nformer index query"} <= set(names)
    text = command_reference.markdown()
    for name in names:
        assert f"`{name}`" in text
    assert "fastreid-train" in text


# ----------------------------------------------------------------------------- result files
def result_files():
    return sorted(RESULTS.glob("*.json"))


def test_there_are_result_files():
    assert result_files(), "results/ holds the figures the docs publish"


@pytest.mark.parametrize("path", result_files(), ids=lambda p: p.name)
def test_result_file_names_a_command_that_exists(path):
    from nformer_plugin.core.results import load_result

    record = load_result(str(path))
    assert record["name"] == path.stem
    assert record["machine"].get("cpu_model") and record["machine"].get("cores")
    assert record["date"] and len(record["commit"]) == 40
    assert record["tables"] or record["lines"], f"{path.name}: no figures"
    assert all(t["rows"] for t in record["tables"])
    words = record["command"].split()
    if words[0] in ("python", "python3"):
        assert (REPO / words[1]).is_file(), f"{path.name}: {words[1]} does not exist"
    else:
        assert words[0] in console_scripts() | {"make"}, f"{path.name}: unknown {words[0]}"
        if words[0] == "nformer" and len(words) > 1:
            from nformer_plugin.cli.main import build_parser

            assert words[1] in dict(command_reference.subcommands(build_parser()))
    for i, word in enumerate(words[:-1]):  # a config file it names exists too
        if word == "--config-file":
            assert (REPO / words[i + 1]).is_file(), f"{path.name}: {words[i + 1]}"


def test_every_result_file_is_shown_and_every_marker_has_a_file():
    """No figure recorded but unpublished, and no page asks for a file that is not there
    (unless it says ``optional``)."""
    pages = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    specs = [results_tables.parse_spec(m.group("spec")) for page in pages
             for m in results_tables.MARKER.finditer(page.read_text())]
    shown = {s["name"] for s in specs}
    assert {p.stem for p in result_files()} <= shown
    for spec in specs:
        assert spec["optional"] or (RESULTS / f"{spec['name']}.json").exists(), spec


def test_rendered_table_carries_its_provenance(tmp_path):
    from nformer_plugin.core.results import write_result

    write_result("x", [{"columns": ["a", "b|c"], "rows": [["1", "2"]]}],
                 "python benchmarks/bench_rerank.py --sizes 10x20", str(tmp_path))
    text = results_tables.render("x", str(tmp_path))
    assert "| a | b\\|c |" in text and "| 1 | 2 |" in text
    assert "`python benchmarks/bench_rerank.py --sizes 10x20`" in text and "commit" in text
    assert "Not yet recorded" in results_tables.render("missing optional", str(tmp_path))
    write_result("y", [{"columns": ["m"], "rows": [["36.3142"], ["0.00241445"], ["7"]]}],
                 "nformer study table1", str(tmp_path))
    text = results_tables.render("y digits=2", str(tmp_path))
    assert "| 36.31 |" in text and "| 0.0024 |" in text and "| 7 |" in text
    with pytest.raises(results_tables.MissingResult):
        results_tables.render("missing", str(tmp_path))


def test_recording_parses_the_printed_tables(tmp_path):
    from nformer_plugin.core.results import recording

    with recording(str(tmp_path), "r", "python benchmarks/bench_export.py"):
        print("threads 1\n| x | y |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\ndone")
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["tables"] == [{"columns": ["x", "y"], "rows": [["1", "2"], ["3", "4"]]}]
    assert record["lines"] == ["threads 1", "done"]
    assert record["load_average_start"] and record["machine"]["cores"] == os.cpu_count()


# ----------------------------------------------------------------------------- the README
def test_readme_is_short_and_has_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text


def test_readme_result_tables_are_current():
    """The README's tables are rendered copies of result files: `python docs/gen/readme.py`."""
    assert readme.stale_blocks((REPO / "README.md").read_text()) == []


def test_a_stale_or_unclosed_readme_block_is_found(tmp_path):
    from nformer_plugin.core.results import write_result

    write_result("z", [{"columns": ["a"], "rows": [["1"]]}], "nformer eval", str(tmp_path))
    current = "<!-- result: z -->\n" + results_tables.render("z", str(tmp_path)) + "<!-- /result -->\n"
    assert readme.stale_blocks(current, str(tmp_path)) == []
    assert readme.stale_blocks(current.replace("| 1 |", "| 2 |"), str(tmp_path)) == ["z"]
    assert readme.stale_blocks("<!-- result: z -->\nold table\n", str(tmp_path)) == ["z"]
