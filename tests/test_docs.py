"""The README's numbers come from committed JSON, and it stays a page for users."""
import json
import os

from benchmarks import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_results_block_is_rendered_from_the_committed_json():
    text = _readme()
    block = text.split(render.MARKERS[0], 1)[1].split(render.MARKERS[1], 1)[0]
    names = sorted(f for f in os.listdir(render.DEFAULT_PATH) if f.endswith(".json"))
    assert names
    for name in names:
        with open(os.path.join(render.DEFAULT_PATH, name)) as f:
            assert render.default_path(json.load(f), name) in block, f"re-run python -m benchmarks.render --readme ({name})"


def test_readme_is_short_and_links_resolve():
    text = _readme()
    assert len(text.encode()) <= 15 * 1024
    for target in [part.split(")", 1)[0] for part in text.split("](")[1:]]:
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), target
