"""The README's GPU numbers are the shipped measurements (data/), not typed-in hopes: each quoted figure is read
back from the file that holds it."""
from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DATA = ROOT / "data"


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_full_model_numbers():
    prefill = json.loads((DATA / "full_model" / "results.json").read_text())["sections"]["prefill"]
    assert f"**{prefill['end_to_end_s']:.1f} s end to end**" in README
    assert f"**{prefill['peak_reserved_GiB']:.1f} GiB**" in README
    assert f"the plan predicted {prefill['planned_peak_GiB']:.1f}" in README
    assert prefill["end_to_end_s"] <= 120 and prefill["peak_reserved_GiB"] <= 130  # the goals
    recording = json.loads(gzip.decompress((DATA / "full_model_recording.json.gz").read_bytes()))
    assert recording["machine"] == "NVIDIA H200" and "synthetic weights, seed 0" in recording["weights"]


def test_kernel_ratios():
    kernels = rows(DATA / "gpu_kernels" / "gpu_kernels.csv")

    def ms(section, variant, context, batch="1"):
        hits = [r for r in kernels if (r["section"], r["variant"], r["context"], r.get("batch", "1")) ==
                (section, variant, str(context), str(batch)) and r["median_ms"]]
        return float(hits[0]["median_ms"])

    dsa, dense = ms("prefill", "dsa_core(fp8 idx+topk+sparse)", 131072), ms("prefill", "dense_cudnn_sdpa", 131072)
    assert f"**{dense / dsa:.2f}×**" in README
    assert f"{dsa:.0f} ms" in README and f"{dense:,.0f} ms" in README


def test_transformers_and_moe_numbers():
    vt = {(r["impl"], r["context"]): r for r in rows(DATA / "gpu_vs_transformers.csv")}
    hf = vt[("transformers deepseek_v32 (sdpa, top-k as a dense mask)", "16384")]
    ours = vt[("dslib backend=triton indexer=fp8", "16384")]
    assert f"**{float(hf['median_ms']) / float(ours['median_ms']):.1f}×**" in README
    moe = [r for r in rows(DATA / "gpu_fp8_moe" / "moe.csv") if r["tokens"] == "16384" and "grouped" in r["impl"]]
    best = max(float(r["tflops"]) for r in moe if r["tflops"])
    assert f"{best:.0f} TFLOP/s" in README


def test_gpu_check_numbers():
    """The whole-model GPU check and the cuBLAS finding the README reports are in the shipped logs."""
    checks = (DATA / "gpu_checks.txt").read_text()
    line = next(x for x in checks.splitlines() if x.strip().startswith("vs fp32 CPU: torch(on)"))
    torch_err = line.split("torch(on) ")[1].split(",")[0]
    triton_err = line.split("triton(on) ")[1].split(",")[0]
    assert f"relative logit error {triton_err} against {torch_err}" in README
    assert float(triton_err) <= 1.25 * float(torch_err) + 5e-3  # what tests/test_gpu_backends.py asserts
    fp8 = (DATA / "gpu_fp8_checks.txt").read_text()
    assert "N=512 K=256 M=640: auto 1.1e+01, triton 1.7e-03, scaled_mm 1.1e+01" in fp8 and "K = 256" in README


def test_notebook_time_table():
    """The README's "Time on a laptop CPU" table is data/notebook_times.csv (full size), row for row."""
    measured = {r["notebook"].removesuffix(".ipynb"): float(r["seconds"])
                for r in rows(DATA / "notebook_times.csv") if r["mode"] == "full"}
    table = README[README.index("### Time on a laptop CPU"):]
    table = table[table.index("| notebook | seconds | goal |"):]
    lines = [x for x in table.split("\n\n")[0].splitlines()[2:] if x.startswith("|")]
    shown = {x.split("|")[1].split()[0]: float(x.split("|")[2]) for x in lines}
    assert shown == measured
    for x in lines:  # each goal that is stated is met
        goal = x.split("|")[3].strip()
        if goal.startswith("≤"):
            assert float(x.split("|")[2]) <= float(goal[1:])


def test_oldest_torch_record():
    """What README says about torch 2.4 is what the recorded run printed."""
    record = (DATA / "oldest_torch.txt").read_text()
    unit = re.search(r"(\d+) passed, (\d+) skipped, \d+ deselected", record)
    cells = re.search(r"= (\d+) passed in", record.split("test-notebooks")[-1])
    assert "torch 2.4.1" in record and "failed" not in record
    assert f"all six\n  notebooks pass ({cells[1]} cells) and {unit[1]} unit tests pass; {unit[2]} skip" in README
    reasons = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", record, re.M)
    assert sum(int(n) for n, _ in reasons) == int(unit[2])
    known = ("transformers 5, the reference, needs torch >= 2.6; this is torch 2.4.1", "needs a CUDA GPU",
             "the kernels do not run here: Triton 3.0.0 is older than 3.6, the oldest these kernels are tested with")
    assert all(why.startswith(known) for _, why in reasons), reasons


def test_make_test_record():
    """The README's account of the repeated `make test` runs is data/make_test_runs.csv."""
    runs = {r["run"]: r for r in rows(DATA / "make_test_runs.csv")}
    ten = [runs[f"ten{i}"] for i in range(1, 11)]
    assert {r["commit"] for r in ten} == {"95e6732"} and all(r["exit_code"] == "0" for r in ten)
    seconds = [int(r["seconds"]) for r in ten]
    assert f"commit 95e6732, {min(seconds)}–{max(seconds)} s each) all passed" in README
    ci1 = runs["ci1"]
    pytest_s = re.search(r"in ([\d.]+)s", ci1["summary"])[1]
    assert ci1["exit_code"] == "0" and "every install" in ci1["note"]
    minutes, secs = divmod(int(ci1["seconds"]), 60)
    assert f"every install included, passed in {minutes} min {secs} s (pytest {float(pytest_s):.0f} s;" in README
    assert all(runs[r]["exit_code"] == "0" for r in ("ci2", "ci3"))
