"""The replay variant of examples/sequential_sentiment_intent.yaml, reusing the no-replay run's stage 1.

Stage 1 (sentiment) is identical in both runs (same data, seed and steps: the loop is seeded and
deterministic), so its folder is copied from runs/seq-sentiment-intent and only stage 2 is run,
exactly as afina.sequential.run_sequential runs it (prepare, replay 20%, train, merge, score).
"""

import json
import shutil
import time

from afina.config import load_recipe
from afina.pipeline import run_stage
from afina.sequential import add_replay, consolidate, score_stage_task, stage_recipes

recipe = load_recipe("examples/sequential_sentiment_intent.yaml", ["name=seq-replay", "stages.1.replay=0.2"])
first, second = stage_recipes(recipe)
shutil.rmtree(recipe.run_dir, ignore_errors=True)
shutil.copytree("runs/seq-sentiment-intent/stages/01-sentiment", first.run_dir)
with_first_model = second.model_copy(update={"model": second.model.model_copy(update={"name": recipe.model.name})})
run_stage("prepare", with_first_model)
counts = add_replay(second, [first], 0.2, recipe.seed + 1)
print("replay:", counts)
began = time.perf_counter()
run_stage("train", second)
train_s = round(time.perf_counter() - began, 1)
model = str(consolidate(second))
scores = {"sentiment": score_stage_task(first, model), "intent": score_stage_task(second, model)}
print("scores after intent (with replay):", json.dumps(scores))
(recipe.run_dir / "replay_result.json").write_text(
    json.dumps({"replay": counts, "train_time_s": train_s, "scores": scores}, indent=1)
)
