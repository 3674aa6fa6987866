"""The library's layout keeps its promises: one concept per short file, the one loop, imports that flow one way
in the order the course teaches, and a README and package docstring that list every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import course_lib

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "course_lib"
MODULES = sorted(p.stem for p in LIB.glob("*.py") if p.stem != "__init__")
MAX_LINES = 450

# The library's layers, bottom up: a module imports only from its own layer and the layers below it. The README's
# chart (docs/library.md) is drawn from this list (`python tests/test_layout.py` rewrites it; a test keeps them equal).
LAYERS = [
    ("foundations", ["settings", "checks", "config", "distributed", "precision", "data", "checkpoint"]),
    ("the noising process and its objective", ["schedules", "forward", "flow", "learned_schedule"]),
    ("sampling", ["guidance", "consistency", "sampling"]),
    ("networks", ["attention", "denoiser", "unet", "dit", "mmdit", "unet_file", "tokenizer", "text"]),
    ("the one loop", ["loop"]),
    ("models that train with the loop", ["train", "vae", "vae_gan", "clip"]),
    ("generation", ["pipeline", "editing"]),
    ("personalisation", ["finetune", "lora", "dreambooth", "textual_inversion", "lidb", "hyperdreambooth"]),
    ("few steps and control", ["lcm", "reflow", "controls", "controlnet"]),
    ("memory techniques", ["quantize", "tiling"]),
    ("Stable Diffusion 1.5", ["clip_tokenizer", "sd_convert", "sd"]),
    ("measuring: never imported by what they measure", ["feature_net", "pixel_metrics", "metrics", "judges", "memory", "budget", "benchmark"]),
    ("display: may import anything, imported by nothing", ["plotting", "widgets"]),
]
LAYER_OF = {m: i for i, (_, members) in enumerate(LAYERS) for m in members}
MEASURING = set(LAYERS[-2][1])                    # read models; no model imports them
DISPLAY = set(LAYERS[-1][1])                      # may import anything; nothing imports them


def imports(module: str) -> set[str]:
    """The course_lib modules `module` imports (relative imports, anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse((LIB / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found & set(MODULES)


def test_every_module_sits_in_one_layer_and_imports_only_downwards():
    listed = [m for _, members in LAYERS for m in members]
    assert sorted(listed) == MODULES, f"not in a layer: {set(MODULES) - set(listed)}; listed twice or gone: " \
                                      f"{sorted(m for m in set(listed) if listed.count(m) > 1 or m not in MODULES)}"
    upward = {m: sorted(d for d in imports(m) if LAYER_OF[d] > LAYER_OF[m]) for m in MODULES}
    assert not any(upward.values()), f"imports from a higher layer: { {m: d for m, d in upward.items() if d} }"


def layer_chart() -> str:
    """The README's chart: each layer a box holding its modules and the imports between them, and an arrow from a
    layer to each layer above that imports from it directly (an arrow implied by two others is left out)."""
    graph = {m: imports(m) for m in MODULES}
    uses = {(LAYER_OF[d], LAYER_OF[m]) for m in MODULES for d in graph[m] if LAYER_OF[d] < LAYER_OF[m]}
    reach = {i: {j for a, j in uses if a == i} for i in range(len(LAYERS))}
    for k in range(len(LAYERS)):                       # transitive closure (Warshall)
        for i in range(len(LAYERS)):
            if k in reach[i]:
                reach[i] |= reach[k]
    direct = sorted((i, j) for i, j in uses if not any(j in reach[k] for k in reach[i] if k != j))
    lines = ["```mermaid", "flowchart BT"]
    for i, (name, members) in enumerate(LAYERS):
        lines.append(f'  subgraph L{i} ["{name}"]')
        inner = [f"{d} --> {m}" for m in members for d in sorted(graph[m]) if LAYER_OF[d] == i]
        lines.append("    " + "; ".join(members + inner))
        lines.append("  end")
    lines += [f"  L{i} --> L{j}" for i, j in direct]
    return "\n".join(lines + ["```"])


def layer_words() -> str:
    """The same layers in words, for a reader without a mermaid renderer."""
    graph = {m: imports(m) for m in MODULES}
    rows = []
    for i, (name, members) in enumerate(LAYERS):
        below = sorted({LAYERS[LAYER_OF[d]][0] for m in members for d in graph[m] if LAYER_OF[d] < i},
                       key=lambda n: [x for x, _ in LAYERS].index(n))
        rows.append(f"{i + 1}. **{name}**: {', '.join(f'`{m}`' for m in members)}"
                    + (f" (import from: {'; '.join(below)})" if below else ""))
    return "\n".join(rows)


LIBRARY_PAGE = ROOT / "docs" / "library.md"     # the module table and the chart (the README links to it)
CHART_BEGIN, CHART_END = "<!-- layers: drawn by tests/test_layout.py -->", "<!-- /layers -->"


def readme_with_chart(readme: str) -> str:
    start, end = readme.index(CHART_BEGIN) + len(CHART_BEGIN), readme.index(CHART_END)
    return readme[:start] + "\n" + layer_chart() + "\n\n" + layer_words() + "\n" + readme[end:]


def test_the_library_pages_chart_is_drawn_from_the_layers():
    page = LIBRARY_PAGE.read_text()
    assert page == readme_with_chart(page), "docs/library.md's chart is stale: run `python tests/test_layout.py`"


def test_an_upward_import_would_be_caught():
    assert LAYER_OF["sampling"] < LAYER_OF["train"] and "sampling" in imports("train")   # allowed: downwards
    assert LAYER_OF["pipeline"] > LAYER_OF["sampling"]           # sampling importing pipeline would be upward


def test_every_module_is_short():
    long = {m: n for m in MODULES if (n := len((LIB / f"{m}.py").read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_backward_only_in_the_loop():
    calling = [m for m in MODULES if re.search(r"\.backward\(", (LIB / f"{m}.py").read_text())]
    assert calling == ["loop"], calling


def test_imports_form_no_cycle_and_nothing_imports_display_or_measuring():
    graph = {m: imports(m) for m in MODULES}
    for m, deps in graph.items():
        assert not deps & DISPLAY or m in DISPLAY, f"{m} imports {deps & DISPLAY}"
        if m not in MEASURING | DISPLAY:
            assert not deps & MEASURING, f"{m} imports the measuring module(s) {deps & MEASURING}"
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import cycle: {' -> '.join(visiting + [m])}"
        if m in done:
            return
        visiting.append(m)
        for d in graph[m]:
            visit(d)
        visiting.pop()
        done.add(m)
    for m in MODULES:
        visit(m)


def test_the_core_never_imports_matplotlib_or_ipywidgets():
    for m in set(MODULES) - DISPLAY:
        text = (LIB / f"{m}.py").read_text()
        assert not re.search(r"^\s*(import|from)\s+(matplotlib|ipywidgets)", text, re.M), m


def test_readme_and_docstring_list_every_module():
    readme = LIBRARY_PAGE.read_text()
    table = set(re.findall(r"^\| `(\w+)\.py` \|", readme, re.M))
    assert table == set(MODULES), f"docs/library.md's table: missing {set(MODULES) - table}, extra {table - set(MODULES)}"
    listed = set(re.findall(r"^    (\w+)\s", course_lib.__doc__, re.M))
    assert set(MODULES) <= listed, f"course_lib's docstring misses {set(MODULES) - listed}"


# --- one sampling path: the objective is named in a few places only ------------------------------------------
# Which objective trained a model (DDPM's predictions or rectified flow's velocity) may be asked in the one place
# that converts a prediction (course_lib.forward), where a prediction picks its path (course_lib.schedules), and
# in the training config that names the objective. Samplers, pipelines, editing and the trainer never branch on it.
OBJECTIVE_QUESTIONS = {("forward", "x0_eps_from"), ("forward", "target_of"), ("schedules", "path_for"),
                       ("train", "TrainConfig.__post_init__"), ("train", "TrainConfig.predicts")}


def _asks_the_objective(node: ast.AST) -> bool:
    """A comparison with "flow", FLOW or an `.objective`."""
    if not isinstance(node, ast.Compare):
        return False
    for side in [node.left, *node.comparators]:
        if isinstance(side, ast.Constant) and side.value == "flow" or isinstance(side, ast.Name) and side.id == "FLOW" \
                or isinstance(side, ast.Attribute) and side.attr == "objective":
            return True
    return False


def objective_questions(source: str, module: str) -> set[tuple[str, str]]:
    """(module, enclosing Class.function) of every comparison that asks which objective a model has."""
    found = set()

    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                walk(child, f"{scope}.{child.name}" if scope else child.name)
            else:
                if _asks_the_objective(child):
                    found.add((module, scope or "<module>"))
                walk(child, scope)
    walk(ast.parse(source), "")
    return found


def test_the_objective_is_asked_only_where_predictions_are_converted():
    asked = set().union(*(objective_questions((LIB / f"{m}.py").read_text(), m) for m in MODULES))
    assert asked <= OBJECTIVE_QUESTIONS, f"branches on the objective outside the conversion point: " \
                                         f"{sorted(asked - OBJECTIVE_QUESTIONS)}"


def test_the_objective_check_catches_a_branch():
    branch = "def sample(model, prediction):\n    if prediction == 'flow':\n        return 1\n"
    assert objective_questions(branch, "sampling") == {("sampling", "sample")}
    assert not objective_questions("def f(p):\n    return p == 'v'\n", "sampling")


def private_imports(module: str) -> set[str]:
    """Names starting with _ that `module` imports from another course_lib module."""
    tree = ast.parse((LIB / f"{module}.py").read_text())
    return {f"{node.module}.{a.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 for a in node.names if a.name.startswith("_")}


def test_no_module_imports_another_ones_private_names():
    found = {m: names for m in MODULES if (names := private_imports(m))}
    assert not found, f"private names imported across modules (make them public): {found}"


if __name__ == "__main__":       # rewrite docs/library.md's chart from LAYERS
    path = LIBRARY_PAGE
    path.write_text(readme_with_chart(path.read_text()))
    print(f"wrote the layer chart into {path}")
