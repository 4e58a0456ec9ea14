"""GGUF exports of a trained run, every type, measured in llama.cpp: what the README's GGUF table shows.

    python bench/bench_gguf.py runs/quickstart                 # a run directory (its manifest's recipe)
    python bench/bench_gguf.py runs/quickstart --types q8_0 q4_k_m

Exports the run's merged model to each GGUF type with llama.cpp's converter and quantizer, with the
thresholds lifted (`export.gguf_max_kl.<type>=1e9`) so every file is measured, not judged; prints per
file: size, K-quant fallbacks, mean/max KL to the trained model, greedy agreement (all positions and
decided ones), top-10 overlap, whether the free-running greedy text is the trained model's, and
llama.cpp's prompt and decode speed on this machine (with the load average: a timing is only
comparable on a quiet machine). Writes the measures to <run>/export/gguf/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from afina.config import load_recipe
    from afina.export.gguf_convert import GGUF_TYPES
    from afina.export.llama_cpp_run import llama_cpp_speed
    from afina.export.merge import export
    from afina.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a trained run directory")
    parser.add_argument("--types", nargs="+", default=list(GGUF_TYPES), choices=GGUF_TYPES)
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' reading of each file")
    args = parser.parse_args(argv)

    manifest = json.loads((args.run / "manifest.json").read_text())
    recipe_file = args.run / "bench-recipe.json"
    recipe_file.write_text(json.dumps(manifest["recipe"]))
    overrides = [
        f"output_dir={args.run.parent}",
        f"name={args.run.name}",
        "export.formats=[gguf]",
        f"export.gguf_types=[{','.join(args.types)}]",
        *(f"export.gguf_max_kl.{t}=1e9" for t in args.types),
    ]
    recipe = load_recipe(str(recipe_file), overrides)
    start = time.perf_counter()
    results = export(recipe)
    seconds = time.perf_counter() - start

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What are your support hours?"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = []
    for outtype in args.types:
        check = results[f"gguf_{outtype}"]
        cpp = check["llama_cpp"]
        speed = llama_cpp_speed(Path(check["path"]), prompt_ids)
        rows.append(
            {
                "type": outtype,
                "size_mb": check["size_mb"],
                "fallbacks": check["fallback_summary"],
                "kl_mean": cpp["kl_mean"],
                "kl_max": cpp["kl_max"],
                "top1": cpp["top1_agreement"],
                "decided": cpp["decided_agreement"],
                "top10": cpp["top10_overlap"],
                "greedy_text_equal": cpp["greedy_text_equal"],
                "positions": cpp["positions"],
                "transformers_kl": (check.get("transformers") or {}).get("kl_mean"),
                **speed,
            }
        )
    load = os.getloadavg()
    print(
        f"{args.run} ({recipe.model.name}): export of {len(args.types)} types took {seconds:.0f} s; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    header = (
        f"{'type':8} {'MB':>7} {'KL mean':>9} {'KL max':>8} {'greedy':>7} {'decided':>8} {'top-10':>7} "
        f"{'same text':>9} {'prompt t/s':>10} {'decode t/s':>10}  fallbacks"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['type']:8} {r['size_mb']:7.1f} {r['kl_mean']:9.2e} {r['kl_max']:8.3f} {r['top1']:7.1%} "
            f"{r['decided']:8.1%} {r['top10']:7.1%} {r['greedy_text_equal']!s:>9} {r['prompt_tokens_per_s']:10.1f} "
            f"{r['decode_tokens_per_s']:10.1f}  {r['fallbacks'] or ''}"
        )
    out = args.run / "export" / "gguf" / "bench.json"
    out.write_text(json.dumps({"rows": rows, "export_seconds": seconds, "loadavg": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
