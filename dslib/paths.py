"""Where the repository's `data/` folder is, for the notebooks that read shipped artifacts (chapter 1).

The notebooks are meant to be opened from the repository (`make lab` opens `notebooks/`), with `data/` one level
up. A notebook copied elsewhere, or a JupyterLab started in another folder, would otherwise retrain for minutes and
then fail on a missing file; `find_data` says so at once, in the notebook's first cells, and says where to open it.

    DATA = find_data(need=["paper_cost_per_token.csv"])   # Path of data/, or a DataNotFoundError that explains
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# The folder that holds dslib/ (the repository, when dslib is installed with `pip install -e .` or used in place).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class DataNotFoundError(FileNotFoundError):
    """The repository's data/ folder (or a file in it) is not where the notebook looks. The message says where
    it looked and how to open the notebook so that it is found."""


def data_candidates(cwd: Path | None = None, package_root: Path | None = None) -> list[Path]:
    """Where `data/` may be, in order: beside the working directory (a notebook opened from the repository root),
    one level up (opened from notebooks/, the usual case), next to the dslib package (an editable install)."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    root = PACKAGE_ROOT if package_root is None else Path(package_root)
    out: list[Path] = []
    for p in (cwd / "data", cwd.parent / "data", root / "data"):
        if p not in out:
            out.append(p)
    return out


def find_data(need: Iterable[str] = (), *, cwd: Path | None = None, package_root: Path | None = None) -> Path:
    """The repository's data/ folder: the first candidate (`data_candidates`) that holds every file in `need`
    (paths relative to data/). Raises `DataNotFoundError`, saying where it looked and what to do, if none does."""
    need = list(need)
    tried = data_candidates(cwd, package_root)
    for folder in tried:
        if folder.is_dir() and all((folder / n).exists() for n in need):
            return folder
    looked = "\n".join(f"  - {p}{'' if p.is_dir() else ' (no such folder)'}" for p in tried)
    missing = "" if not need else f" with {', '.join(need)}"
    raise DataNotFoundError(
        f"This notebook needs the repository's data/ folder{missing} (trained checkpoints and published figures that "
        f"ship with the repository), and did not find it. It looked in:\n{looked}\n"
        "Open the notebook from the repository: in a clone of it run `make lab` (JupyterLab opens on notebooks/), or "
        "start JupyterLab in the repository folder and open notebooks/<this notebook>. A notebook copied on its own "
        "cannot find data/."
    )
