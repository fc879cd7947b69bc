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
    paths = [rel for bench in render.TRAIN_STEP for rel in render.results(bench)]
    assert paths
    for rel in paths:
        with open(os.path.join(ROOT, rel)) as f:
            assert render.default_path(json.load(f), rel) in block, (
                f"re-run python -m benchmarks.render --readme ({rel})"
            )


def test_every_preset_has_a_module_and_renders_where_its_results_go():
    from benchmarks import suite

    for name, preset in suite.PRESETS.items():
        assert os.path.exists(os.path.join(ROOT, "benchmarks", preset.module + ".py")), name
        cmd = suite.command(name, device="h100")
        assert cmd[cmd.index("--out") + 1].startswith(os.path.join(suite.RESULTS, preset.results)), name
    for bench in [*render.RENDER, *render.TRAIN_STEP]:
        for rel in render.results(bench):
            assert rel.removeprefix(f"benchmarks/results/{bench}/").removesuffix(".json").isidentifier()


def test_readme_is_short_and_links_resolve():
    text = _readme()
    assert len(text.encode()) <= 15 * 1024
    for target in [part.split(")", 1)[0] for part in text.split("](")[1:]]:
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target.split("#", 1)[0])), target
