"""The examples in README.md and docs/ run, so they cannot rot."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", "docs/guide.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("document", DOCUMENTS)
def test_document_examples_run_top_to_bottom(document):
    blocks = python_blocks(ROOT / document)
    assert blocks, f"{document} has no python examples to run"
    namespace = {"__name__": f"docs_{Path(document).stem}"}
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"{document} (example {number})", "exec")
        exec(code, namespace)
