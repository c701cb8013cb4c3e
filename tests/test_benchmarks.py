"""The GPU benchmark script runs end to end on the CPU with tiny configs (its GPU numbers need a GPU machine)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_full_size.py"), "--tiny", "--device", "cpu",
                           "--runs", "1", "--skip", "vae", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| [^-]", line) and not line.startswith("| model")
            and not line.startswith("| mode") and not line.startswith("| size")]
    assert len(rows) == 2 + 4, table  # 2 models x 1 size, 4 memory modes
    for row in rows:
        seconds = float(row.split("|")[3])
        assert seconds > 0, row
    assert "fp8 + block swap (1 of 2 swapped)" in table


def test_long_video_benchmark_smoke_run_prints_every_section():
    from conftest import golden_path

    model = golden_path("models", "EasyAnimateV5-tiny-zh-InP")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "long_video.py"), "--model", str(model),
                           "--height", "16", "--width", "16", "--chunk", "5", "--overlap", "1", "--steps", "1",
                           "--lengths", "5,9", "--long-frames", "13"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    lines = out.splitlines()
    assert sum(line.startswith("| continue |") for line in lines) == 2, out
    assert sum(line.startswith("| windows |") for line in lines) == 2, out
    assert "s/frame ratio continue / independent:" in out and "at seams" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 4 |")]
    assert rows and all(line.split("|")[3].strip() == line.split("|")[2].split()[0] for line in rows), out
