"""Benchmark: afina's data cleaning and deduplication against a common baseline, side by side.

    flock /tmp/afina-bench.lock python bench/bench_prepare.py            # 1,000,000 rows; near-dup on 100,000
    flock /tmp/afina-bench.lock python bench/bench_prepare.py --rows 200000 --near-rows 20000   # quicker

1. Clean + exact dedup, streaming a JSONL file of ~500-character rows (10% planted duplicates that differ
   in case and spacing, some text needing NFC and control-character removal):
   - afina: iter_source -> to_canonical -> TextCleaner.clean_row -> exact_key set (what `afina prepare`
     runs before tokenizing), one row at a time.
   - baseline: pandas, the usual notebook way: read_json(lines=True), str.normalize + strip, then
     drop_duplicates on the case- and space-folded text (all rows in memory).
   Each runs in its own process; peak memory is that process's maximum resident set size.
2. Near-duplicate detection on 100,000 rows (5% planted near duplicates: a few words changed):
   - afina: NearDuplicateIndex (MinHash with shared permutations, batch update, LSH, similarity check).
   - baseline: datasketch as its README shows it (a MinHash per row updated shingle by shingle, LSH).
   Recall is the share of planted near duplicates found; extra is rows flagged that were not planted.

Both sides run in the same invocation on the same files; compare ratios (the CPU is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(os.environ.get("AFINA_BENCH_DIR", "/tmp/afina-bench"))


def make_rows_file(path: Path, n: int, seed: int = 0) -> None:
    """~500-character rows of made-up words; 10% are copies of an earlier row with changed case/spacing."""
    if path.exists():
        return
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(rng.randint(1, 4)))
        for _ in range(20000)
    ]
    texts: list[str] = []
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(n):
            if texts and rng.random() < 0.10:
                text = rng.choice(texts[-5000:]).upper().replace(" ", "  ")
            else:
                words = []
                while sum(len(w) + 1 for w in words) < 500:
                    words.append(rng.choice(vocab))
                text = " ".join(words)
                if i % 50 == 0:
                    text = "Cafe\u0301 \x07" + text  # needs NFC and control-character removal
                texts.append(text)
            fh.write(json.dumps({"text": text, "label": "ab"[i % 2]}) + "\n")
    tmp.rename(path)


def run_afina_clean(path: str) -> dict:
    from afina.config import CleanConfig, PiiConfig
    from afina.data.clean import TextCleaner, is_empty
    from afina.data.dedup import exact_key
    from afina.data.load import Record, iter_source
    from afina.data.schema import content_text, to_canonical

    start = time.perf_counter()
    cleaner = TextCleaner(CleanConfig(), PiiConfig())
    seen: set[bytes] = set()
    rows = kept = 0
    for item in iter_source(Path(path)):
        rows += 1
        if not isinstance(item, Record):
            continue
        row = cleaner.clean_row(to_canonical(item.row, "classification", {}, None))
        if is_empty(row):
            continue
        key = exact_key(content_text(row))
        if key in seen:
            continue
        seen.add(key)
        kept += 1
    return {"rows": rows, "kept": kept, "seconds": time.perf_counter() - start}


def run_pandas_clean(path: str) -> dict:
    import pandas as pd

    start = time.perf_counter()
    frame = pd.read_json(path, lines=True)
    rows = len(frame)
    frame["text"] = (
        frame["text"].str.normalize("NFC").str.replace(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", regex=True).str.strip()
    )
    frame = frame[frame["text"] != ""]
    key = frame["text"].str.casefold().str.split().str.join(" ")
    kept = int((~key.duplicated()).sum())
    return {"rows": rows, "kept": kept, "seconds": time.perf_counter() - start}


def make_near_rows(n: int, seed: int = 1) -> tuple[list[str], set[int]]:
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(rng.randint(1, 4)))
        for _ in range(20000)
    ]
    texts, planted = [], set()
    for i in range(n):
        if texts and rng.random() < 0.05:
            words = rng.choice(texts).split()
            for _ in range(2):  # change two words of ~85: Jaccard of 3-shingles stays around 0.87
                words[rng.randrange(len(words))] = rng.choice(vocab)
            planted.add(i)
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(85)))
    return texts, planted


def run_afina_near(n: int) -> dict:
    from afina.data.dedup import NearDuplicateIndex

    texts, planted = make_near_rows(n)
    start = time.perf_counter()
    index = NearDuplicateIndex(threshold=0.8, num_perm=128, shingle=3)
    flagged = set()
    for i, text in enumerate(texts):
        minhash = index.signature(text)
        if index.find(minhash) is not None:
            flagged.add(i)
        else:
            index.add(str(i), minhash)
    return _near_result(n, flagged, planted, time.perf_counter() - start)


def run_datasketch_near(n: int) -> dict:
    from datasketch import MinHash, MinHashLSH

    texts, planted = make_near_rows(n)
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    flagged = set()
    for i, text in enumerate(texts):
        words = text.lower().split()
        minhash = MinHash(num_perm=128)
        for j in range(len(words) - 2):
            minhash.update(" ".join(words[j : j + 3]).encode("utf-8"))
        if lsh.query(minhash):
            flagged.add(i)
        else:
            lsh.insert(str(i), minhash)
    return _near_result(n, flagged, planted, time.perf_counter() - start)


def _near_result(n: int, flagged: set[int], planted: set[int], seconds: float) -> dict:
    return {
        "rows": n,
        "seconds": seconds,
        "planted": len(planted),
        "recall": len(flagged & planted) / max(1, len(planted)),
        "extra": len(flagged - planted),
    }


def in_child(function: str, arg: str | int) -> dict:
    """Run one measurement in a fresh process; add its peak resident memory."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_prepare as b; "
        f"print(json.dumps(b.{function}({arg!r})))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{function} failed")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--near-rows", type=int, default=100_000)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / f"rows_{args.rows}.jsonl"
    make_rows_file(data, args.rows)
    print(f"data: {data} ({data.stat().st_size / 1e6:.0f} MB, {args.rows} rows); CPU cores: {os.cpu_count()}")

    results = {"afina clean+exact dedup": in_child("run_afina_clean", str(data))}
    if not args.skip_baseline:
        results["pandas clean+exact dedup"] = in_child("run_pandas_clean", str(data))
    results["afina near-dup"] = in_child("run_afina_near", args.near_rows)
    if not args.skip_baseline:
        results["datasketch README near-dup"] = in_child("run_datasketch_near", args.near_rows)

    print(f"{'what':<28} {'rows':>9} {'kept':>9} {'seconds':>8} {'rows/s':>9} {'peak MB':>8}  notes")
    for name, r in results.items():
        notes = f"recall {r['recall']:.3f} of {r['planted']} planted, {r['extra']} extra" if "recall" in r else ""
        print(
            f"{name:<28} {r['rows']:>9} {r.get('kept', ''):>9} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>9.0f} "
            f"{r['peak_rss_mb']:>8.0f}  {notes}"
        )
    if not args.skip_baseline:
        a, p = results["afina clean+exact dedup"], results["pandas clean+exact dedup"]
        print(
            f"clean+exact: afina/pandas speed {p['seconds'] / a['seconds']:.2f}x, memory "
            f"{a['peak_rss_mb'] / p['peak_rss_mb']:.2f}x"
        )
        a, d = results["afina near-dup"], results["datasketch README near-dup"]
        print(f"near-dup: afina/datasketch-README speed {d['seconds'] / a['seconds']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
