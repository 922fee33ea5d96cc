"""Print one optional-dependency group of pyproject.toml, one requirement per line, so CI steps
install exactly what `pip install ".[GROUP]"` would, without rebuilding normkit itself."""
import sys
import tomllib
from pathlib import Path

with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"][sys.argv[1]]))
