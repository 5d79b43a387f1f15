"""EIR's per-node profile of a pass beside ONNX Runtime's, block by block.

EIR: `EIR_ONNX_PROFILE=nodes EIR_BENCH_BATCH=1 <onnx bench binary> 2> eir.log` logs one
"ONNX profile:" line per pass, each fused step named after all its nodes
(`conv_19(Conv)+...+add_49(Add)`). ONNX Runtime: `ort_profile.py MODELS 1` writes `ort_b1.json`
({node: [median ms, op, shape]}, fused NCHWc nodes named after their last node plus `_nchwc`).
Each EIR step is set against the sum of the ORT nodes it names; the biggest differences first.

Usage: profile_compare.py eir.log ort_b1.json [ROWS]
"""

import collections
import json
import re
import sys


def main():
    eir = collections.defaultdict(list)
    with open(sys.argv[1]) as f:
        for line in f:
            if "ONNX profile:" not in line:
                continue
            body = line.split("ONNX profile:", 1)[1]
            for m in re.finditer(r"(\S+) ([0-9.]+)ms/(\d+)", body):
                eir[m.group(1)].append(float(m.group(2)))
    eir_median = {k: sorted(v)[len(v) // 2] for k, v in eir.items()}
    with open(sys.argv[2]) as f:
        ort = json.load(f)
    ort_ms = collections.defaultdict(float)
    for node, (ms, *_) in ort.items():
        ort_ms[re.sub(r"_nchwc$", "", node)] += ms
    rows, matched = [], set()
    for step, ms in eir_median.items():
        names = re.findall(r"([A-Za-z0-9_/.:-]+)\(", step)
        theirs = sum(ort_ms.get(n, 0.0) for n in names)
        matched.update(n for n in names if n in ort_ms)
        label = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        rows.append((ms, theirs, label))
    rows += [(0.0, ms, f"(ORT only) {n}") for n, ms in ort_ms.items() if n not in matched]
    print(f"sum of medians: EIR {sum(eir_median.values()):.3f} ms, ONNX Runtime {sum(ort_ms.values()):.3f} ms")
    print(f"{'EIR ms':>8} {'ORT ms':>8} {'diff':>8} {'ratio':>6}  step")
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    for ours, theirs, label in sorted(rows, key=lambda r: r[1] - r[0])[:limit]:
        ratio = f"{ours / theirs:5.2f}x" if theirs else "     -"
        print(f"{ours:8.3f} {theirs:8.3f} {ours - theirs:+8.3f} {ratio}  {label}")


if __name__ == "__main__":
    main()
