"""Learning curves for the README: `afina advise` on the quickstart (the packaged recipe as
`afina quickstart` runs it, all five systems) and on seeded samples of two use-case recipes,
rt-polarity sentiment (examples/rt_sentiment.yaml, 2,000 rows) and Banking77 intents
(examples/banking77_intents.yaml, 3,000 train rows, 600 test rows); each prepared, trained, evaluated,
then trained again on 10/25/50% of its train split.

    flock /tmp/afina-bench.lock python bench/advise_use_cases.py --out /tmp/advise-bench \
        [--quickstart-run runs/quickstart]

`--quickstart-run` reuses a finished quickstart run (copied, not modified) for the 100% point instead of
running it again (about 15 minutes on 2 cores).

Prints each learning curve and the time it took; the charts are <out>/runs/<name>/advise/learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from importlib import resources
from pathlib import Path

from afina.advise import CURVE_FILE, fit_and_save, format_learning_curve, learning_curve
from afina.config import load_recipe
from afina.pipeline import run_stage
from afina.rundir import RunDir

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES: dict[str, tuple[str, str | None, int | None, list[str]]] = {
    "quickstart": (str(resources.files("afina") / "recipes" / "quickstart.yaml"), None, None, []),
    "rt-sentiment-2k": (
        "examples/rt_sentiment.yaml",
        "sentiment_rt_polarity.jsonl",
        2000,
        ["training.eval_every=10", "data.split.test=0.15"],
    ),
    "banking77-3k": (
        "examples/banking77_intents.yaml",
        "intent_banking77_train.jsonl",
        3000,
        ["training.eval_every=30", "eval.max_examples=600"],
    ),
}


def sample_file(source: Path, rows: int, target: Path) -> Path:
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    target.write_text("\n".join(lines[:rows]) + "\n", encoding="utf-8")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/advise-bench")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quickstart-run", help="a finished quickstart run to reuse for the 100%% point")
    parser.add_argument(
        "--refit", action="store_true", help="only fit the saved curves again (after a change to the fit), no training"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.cases.split(","):
        recipe_path, source, rows, overrides = CASES[name]
        settings = [f"name={name}", f"output_dir={out / 'runs'}", *overrides]
        if source is not None and rows is not None:
            settings.append(f"data.path={sample_file(DATA / source, rows, out / f'{name}.jsonl')}")
        recipe = load_recipe(recipe_path, settings)
        run_root = Path(recipe.run_dir)
        if args.refit:
            saved = json.loads((run_root / "advise" / CURVE_FILE).read_text(encoding="utf-8"))
            result = fit_and_save(RunDir(run_root), saved, recipe.seed)
            print(format_learning_curve(result))
            print(json.dumps({"case": name, "fit": result["fit"]}))
            continue
        if name == "quickstart" and args.quickstart_run and not run_root.exists():
            shutil.copytree(args.quickstart_run, run_root, ignore=shutil.ignore_patterns("checkpoints", "export"))
        began = time.perf_counter()
        if not (run_root / "eval" / "metrics.json").is_file():
            for stage in ("prepare", "train", "eval"):
                run_stage(stage, recipe)
        result = learning_curve(recipe)
        print(format_learning_curve(result))
        print(json.dumps({"case": name, "seconds": round(time.perf_counter() - began, 1), "fit": result["fit"]}))


if __name__ == "__main__":
    main()
