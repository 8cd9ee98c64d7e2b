"""A notebook opened away from the repository says at once that it cannot find data/, and where to open it from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dslib.paths as paths
from dslib.paths import DataNotFoundError, find_data

ROOT = Path(__file__).resolve().parents[1]
NEEDS_DATA = ["03_sparse_attention.ipynb", "04_moe_routing.ipynb", "05_full_model.ipynb"]


def test_found_from_the_repository_and_from_notebooks():
    assert find_data(cwd=ROOT) == ROOT / "data"
    assert find_data(cwd=ROOT / "notebooks", need=["paper_cost_per_token.csv"]) == ROOT / "data"


def test_found_through_an_editable_install_from_anywhere(tmp_path):
    assert find_data(cwd=tmp_path, package_root=ROOT, need=["ch3_recall.json"]) == ROOT / "data"


def test_missing_data_explains_where_it_looked_and_what_to_do(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataNotFoundError) as err:
        find_data(cwd=tmp_path / "elsewhere", package_root=tmp_path / "site-packages")
    msg = str(err.value)
    assert str(tmp_path / "elsewhere" / "data") in msg and "no such folder" in msg
    assert "make lab" in msg and "notebooks/" in msg


def test_a_needed_file_must_be_there(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataNotFoundError, match="moe/moe_train_log.json"):
        find_data(["moe/moe_train_log.json"], cwd=tmp_path, package_root=tmp_path)
    (tmp_path / "data" / "moe").mkdir()
    (tmp_path / "data" / "moe" / "moe_train_log.json").write_text("{}")
    assert find_data(["moe/moe_train_log.json"], cwd=tmp_path, package_root=tmp_path) == tmp_path / "data"


@pytest.mark.parametrize("name", NEEDS_DATA)
def test_notebook_without_data_stops_in_its_first_cells(name, tmp_path, monkeypatch):
    """Run the notebook's code cells in order from a folder without data/ (and a dslib without a repository
    around it): the DataNotFoundError must come within the first three code cells, before any training."""
    cells = [c for c in json.loads((ROOT / "notebooks" / name).read_text())["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "PACKAGE_ROOT", tmp_path / "site-packages")
    monkeypatch.setenv("DSLIB_FAST", "1")
    threads = torch.get_num_threads()
    namespace: dict = {}
    try:
        for i, cell in enumerate(cells[:3]):
            src = "\n".join(line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith("%"))
            try:
                exec(compile(src, f"{name} cell {i}", "exec"), namespace)
            except DataNotFoundError as err:
                assert "make lab" in str(err)
                return
        pytest.fail(f"{name}: the first three code cells ran without noticing that data/ is missing")
    finally:
        torch.set_num_threads(threads)
