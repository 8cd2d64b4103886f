"""What the docs say is what runs: the shell and Python blocks of README.md and docs/*.md.

Every fenced block tagged ``bash``, ``sh`` or ``python`` runs, in the order of its page, in a
folder of its own that holds small feature files (``train.npz``, ``query.npz``,
``gallery.npz``: clustered features of a few hundred images), a trained
``out/model_final.pth`` and links to the checkout's ``configs/``, ``tools/`` and
``benchmarks/``. A block that needs a dataset, a GPU, weights of a real training or minutes of
work is preceded by ``<!-- skip: the reason -->`` and only counted. So a renamed flag or a moved
name breaks this test, not a reader.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_feature_files

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
RUN = {"bash": "bash", "sh": "bash", "python": "python"}
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$",
                   re.S | re.M)
SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")
BLOCK_TIMEOUT = 180


def blocks(path: Path):
    """(line, language, code, skip reason or None) of every fenced block of a page."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip().split()
        lang = info[0] if info else ""
        line = text.count("\n", 0, m.start()) + 1
        before = [x for x in text[:m.start()].splitlines() if x.strip()]
        skip = SKIP.search(before[-1]) if before else None
        indent = len(m.group("indent"))
        code = "\n".join(x[indent:] for x in m.group("body").splitlines())
        out.append((line, lang, code, skip.group("reason") if skip else None))
    return out


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", NFORMER_NUM_THREADS="1", MKL_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Feature files and a trained model, made once; each page gets a copy."""
    root = tmp_path_factory.mktemp("docs_fixture")
    write_feature_files(root, 90, 8, 60, dim=64, seed=3, queries_per_id=2,
                        names=("train", "query", "gallery"))
    out = subprocess.run(["nformer", "train", "--train", "train.npz", "--output", "out"],
                         cwd=root, env=environment(), capture_output=True, text=True,
                         timeout=BLOCK_TIMEOUT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return root


def page_dir(workdir, tmp_path):
    target = tmp_path / "page"
    shutil.copytree(workdir, target)
    for name in ("configs", "tools", "benchmarks"):
        (target / name).symlink_to(REPO / name)
    return target


def test_pages_have_blocks_and_every_skip_says_why():
    found = {p.name: blocks(p) for p in PAGES}
    assert sum(1 for p in found.values() for b in p if b[3] is None and b[1] in RUN) >= 5
    for name, page in found.items():
        for line, lang, _, reason in page:
            assert reason is None or len(reason) > 5, f"{name}:{line}: a skip needs a reason"
            assert lang, f"{name}:{line}: a fenced block needs a language (text, bash, ...)"


def runnable(page: Path):
    return [b for b in blocks(page) if b[1] in RUN and b[3] is None]


RUNNABLE_PAGES = [p for p in PAGES if runnable(p)]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[p.name for p in RUNNABLE_PAGES])
def test_code_blocks_run(page, workdir, tmp_path):
    cwd = page_dir(workdir, tmp_path)
    for line, lang, code, _ in runnable(page):
        if RUN[lang] == "bash":
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            command = [sys.executable, "-c", code]
        out = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True,
                             text=True, timeout=BLOCK_TIMEOUT)
        assert out.returncode == 0, (
            f"{page.relative_to(REPO)}:{line} ({lang} block) failed with exit code "
            f"{out.returncode}:\n{code}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n"
            f"{out.stderr[-3000:]}")
