"""MkDocs hooks (``hooks:`` in ``mkdocs.yml``): the generated parts of the pages.

On each page, a line ``<!-- gen:config-reference -->`` becomes the configuration reference
(``config_reference.py``), ``<!-- gen:command-reference -->`` the command reference
(``command_reference.py``), ``<!-- gen:module-index -->`` every module with the first sentence
of its docstring (``module_index.py``), and ``<!-- result: NAME ... -->`` a table of ``results/NAME.json``
(``results_tables.py``). Nothing generated is committed; a missing result file fails the build.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

import command_reference  # noqa: E402
import config_reference  # noqa: E402
import module_index  # noqa: E402
import results_tables  # noqa: E402

GENERATORS = {
    "<!-- gen:config-reference -->": config_reference.markdown,
    "<!-- gen:command-reference -->": command_reference.markdown,
    "<!-- gen:module-index -->": module_index.markdown,
}


def on_page_markdown(markdown, page, config, files, **kwargs):
    from mkdocs.exceptions import PluginError

    lines = markdown.split("\n")
    for i, line in enumerate(lines):  # a marker is a line of its own (not one quoted in text)
        if line.strip() in GENERATORS:
            lines[i] = GENERATORS[line.strip()]()
    markdown = "\n".join(lines)
    try:
        return results_tables.replace_markers(markdown)
    except (results_tables.MissingResult, ValueError) as e:
        raise PluginError(f"{page.file.src_path}: {e}") from e
