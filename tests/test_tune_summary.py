"""scripts/tune_monokernel.py --summarize: the means over interleaved rounds from a saved output."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tune_monokernel.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_summarize_means_each_variant_against_the_baselines_mean(tmp_path):
    def row(shape, tps, tuning):
        return json.dumps({"gpu": "G", "read_bandwidth_Bps": 3e12, "tokens_per_s": tps,
                           "step_us": 1e6 / tps, "achieved_Bps": 2e12, "pct_of_read_bw": 66.7,
                           "shape": shape, "tuning": tuning})
    lines = [row("a", 100.0, {}), row("a", 103.0, {"K": 1}), "a line of other output",
             row("a", 102.0, {}), row("a", 104.0, {"K": 1}), row("b@2000", 50.0, {"K": 1}),
             row("b@2000", 40.0, {})]
    out = tmp_path / "v.txt"
    out.write_text("\n".join(lines) + "\n")
    r = run("--summarize", str(out))
    assert r.returncode == 0, r.stderr
    means = r.stdout.split("means over rounds")[1].splitlines()[1:]
    # a's baseline mean 101: K=1 mean 103.5 is +2.48 %, its rounds +1.98 / +2.97
    assert means[0].split()[:4] == ["a", "101.0", "n=2", "baseline"] and "(-0.99 / +0.99)" in means[0]
    assert "+2.48 % (+1.98 / +2.97)" in means[1] and means[1].endswith('{"K": 1}')
    # b's first variant is its baseline, whatever its tuning
    assert "baseline" in means[2] and "-20.00 % (-20.00)" in means[3]
    assert "vs1st" in r.stdout and "1.030" in r.stdout     # the run table still comes first
    (tmp_path / "none.txt").write_text("no runs\n")
    r = run("--summarize", str(tmp_path / "none.txt"))
    assert r.returncode != 0 and "no JSON lines" in r.stderr
    r = run("--summarize", str(tmp_path / "missing.txt"))
    assert r.returncode != 0 and "No such file" in r.stderr and "Traceback" not in r.stderr
