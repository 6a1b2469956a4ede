"""Write the README's model table from the family registry (comfy_xdit/models/families.py).

    python tools/make_model_table.py          # rewrite the table in README.md
    python tools/make_model_table.py --check  # exit 1 if README.md differs (tests/test_families.py does this)

The table sits between the two marker comments below; everything else in the README is left as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- model-table:start (tools/make_model_table.py) -->", "<!-- model-table:end -->"


def render(readme: str) -> str:
    sys.path.insert(0, str(ROOT))
    from comfy_xdit.models.families import markdown_table

    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{markdown_table()}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's model table is out of date: run python tools/make_model_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    print("wrote the model table in README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
