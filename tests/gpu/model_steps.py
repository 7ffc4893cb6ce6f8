#!/usr/bin/env python3
"""Per-step hip cost inside the whole 32-layer step, from `bench-gpu-model --json` files.

The bench's "hip us/layer" headline is (step - dense part) / hip layers, amortised over the refresh cycle;
this splits it by step of the cycle (host-metadata path and one CUDA graph per step): refresh steps 0, 8,
4/12 and the median of the steps that refresh nothing. Next to it the single-layer profile's amortised
figure (one layer repeated on the same K/V, so its L2 is warm), which earlier tables quoted.

    python3 tests/gpu/model_steps.py out/logs/model-*.json
"""
import json
import statistics
import sys


def ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def per_layer(steps, dense_ms, n_hip):
    return [(s - dense_ms) * 1e3 / n_hip for s in steps]


def main(paths):
    print("| run | tokens x batch | path | step 0 | step 8 | steps 4 / 12 | no-refresh (median) | amortised us/layer | single-layer profile | vs SDPA |")
    print("|---|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for p in paths:
        try:
            d = json.load(open(p))
        except (OSError, ValueError) as e:
            print(f"| {p} | unreadable: {e} |")
            continue
        name = p.rsplit("/", 1)[-1].removeprefix("model-").removesuffix(".json")
        for r in d["rows"]:
            n_hip = r["layers"] - r["dense_layers"]
            prof = r["hip_layer_profile"]
            for path, key, sp, pkey in (("host", "step_ms_by_cycle_host", "speedup_vs_sdpa", "host_step_ms"),
                                        ("graph", "step_ms_by_cycle_graph", "speedup_vs_sdpa_graph", "device_graph_step_ms")):
                us = per_layer(r[key], r["dense_part_ms"], n_hip)
                c = len(us)
                plain = [u for i, u in enumerate(us) if i % 4 != 0]
                single = statistics.mean(prof[pkey]) * 1e3
                s4 = f"{us[4]:.1f} / {us[12]:.1f}" if c >= 16 else "-"
                s8 = f"{us[8]:.1f}" if c >= 16 else "-"
                print(f"| {name} | {r['tokens']}x{r['batch']} | {path} | {us[0]:.1f} | {s8} | {s4} | {statistics.median(plain):.1f} | "
                      f"**{statistics.mean(us):.1f}** | {single:.1f} | {ratio(r[sp])} |")
            eg = r.get("engine_graph")
            if eg:
                us = eg["hip_layer_us_by_cycle"]
                plain = [u for i, u in enumerate(us) if i % 4 != 0]
                s4 = f"{us[4]:.1f} / {us[12]:.1f}" if len(us) >= 16 else "-"
                s8 = f"{us[8]:.1f}" if len(us) >= 16 else "-"
                print(f"| {name} | {r['tokens']}x{r['batch']} | engine graph (SGLang route) | {us[0]:.1f} | {s8} | {s4} | "
                      f"{statistics.median(plain):.1f} | **{statistics.mean(us):.1f}** | - | - |")


if __name__ == "__main__":
    main(sys.argv[1:])
