"""`afina monitor LOGS --run runs/NAME`: is the served model still seeing what it was trained on?

From the server's request and feedback logs (`afina serve --log-dir`) and the run's train split:

    traffic      requests, latency (p50/p95), feedback rate, mean rating and corrections per hour or day
    drift        each recent prompt's MiniLM cosine distance to its nearest training prompt, against the train
                 split's own 95th percentile of that distance (each train prompt to its nearest other one, so a
                 prompt like the training data is beyond it 5% of the time); the share beyond it, and the far
                 prompts grouped into clusters (new topics) with their most typical examples
    answers      answer length and refusal rate, recent vs earlier traffic (and vs the train answers)
    verdict      retrain or not, in one sentence with the numbers behind it

The report goes to <run>/monitor/report.json.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from afina.data.load import DataError, iter_json_objects
from afina.rundir import RunDir, read_jsonl, write_json_atomic

EXPECTED_SHARE = 0.05  # beyond the train split's 95th percentile, by construction
REFUSAL = re.compile(
    r"\b(I'm sorry|I am sorry|I can(?:no|')t (?:help|assist|answer|provide)|I'm (?:not able|unable) to|"
    r"I am (?:not able|unable) to|as an AI|I don't have (?:access|information))",
    re.IGNORECASE,
)
STOPWORDS = set(
    """a an the and or but if of to in on at for from by with about as is are was were be been being do does
did have has had i me my we our you your he she it its they them their this that these those what which who whom how
why when where can could would should will shall may might must not no yes so than then there here just also very
please hi hello thanks thank get got any some all more most much many into out up down over again""".split()
)
MAX_TRAIN_PROMPTS = 3000


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    return None


def prompt_text(row: dict[str, Any]) -> str:
    """The user's last words in a logged request or a canonical row (what drift compares)."""
    messages = row.get("messages") or (row["prompt"] if isinstance(row.get("prompt"), list) else None)
    if messages:
        users = [m["content"] for m in messages if m.get("role") == "user"]
        return users[-1] if users else messages[-1]["content"]
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    return " ".join(row.get("tokens", []))


def answer_text(row: dict[str, Any]) -> str | None:
    if "answer" in row:
        return row["answer"]
    if "messages" in row and row["messages"][-1]["role"] == "assistant":
        return row["messages"][-1]["content"]
    return row.get("chosen") or row.get("completion")


def read_requests(log_dir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The logged requests in time order (each with a parsed `_time`) and the latest feedback per id."""
    path = log_dir / "requests.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: start `afina serve` with --log-dir {log_dir} to write it")
    requests = []
    for number, row in iter_json_objects(path):
        when = parse_time(row.get("time"))
        if when is None:
            raise DataError(f"{path}:{number}: field 'time' is missing or not an ISO time (YYYY-MM-DDTHH:MM:SS+zzzz)")
        requests.append({**row, "_time": when})
    if not requests:
        raise DataError(f"{path}: no requests logged yet")
    feedback: dict[str, dict[str, Any]] = {}
    if (log_dir / "feedback.jsonl").is_file():
        for _, row in iter_json_objects(log_dir / "feedback.jsonl"):
            feedback[row["id"]] = row
    requests.sort(key=lambda r: r["_time"])
    return requests, feedback


def traffic(requests: list[dict[str, Any]], feedback: dict[str, dict[str, Any]], bucket: str) -> list[dict[str, Any]]:
    """Per hour or day: requests, latency, feedback rate, mean rating, corrections, answer length, refusals."""
    fmt = "%Y-%m-%d" if bucket == "day" else "%Y-%m-%d %H:00"
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in requests:
        groups.setdefault(row["_time"].strftime(fmt), []).append(row)
    out = []
    for period, rows in groups.items():
        notes = [feedback[r["id"]] for r in rows if r["id"] in feedback]
        ratings = [n["rating"] for n in notes if n.get("rating") is not None]
        latencies = sorted(r["latency_s"] for r in rows if isinstance(r.get("latency_s"), (int, float)))
        out.append(
            {
                "period": period,
                "requests": len(rows),
                "latency_p50_s": round(_percentile(latencies, 50), 4) if latencies else None,
                "latency_p95_s": round(_percentile(latencies, 95), 4) if latencies else None,
                "feedback_rate": round(len(notes) / len(rows), 4),
                "mean_rating": round(statistics.fmean(ratings), 3) if ratings else None,
                "corrections": sum(1 for n in notes if n.get("correction")),
                **answer_stats([r.get("answer") or "" for r in rows]),
            }
        )
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(sorted_values, q))


def answer_stats(answers: list[str]) -> dict[str, float | None]:
    if not answers:
        return {"answer_words": None, "refusal_rate": None}
    return {
        "answer_words": round(statistics.fmean(len(a.split()) for a in answers), 1),
        "refusal_rate": round(sum(bool(REFUSAL.search(a)) for a in answers) / len(answers), 4),
    }


def nearest_distances(queries, keys, exclude_self: bool = False):
    """Cosine distance (1 - cos) of each unit-length query to its nearest key."""

    scores = queries @ keys.T
    if exclude_self:
        scores.fill_diagonal_(-2.0)
    return (1.0 - scores.max(dim=1).values).clamp(min=0.0)


def new_topics(
    prompts: list[str], vectors, train_words: Counter[str], train_total: int, min_size: int, examples: int = 3
) -> list[dict[str, Any]]:
    """The far prompts grouped by meaning (average-linkage clusters of MiniLM vectors), largest first, each
    named by its most distinctive words and shown by the prompts nearest its centre."""
    if len(prompts) < 2:
        return (
            [{"size": len(prompts), "label": _label(prompts, train_words, train_total), "examples": prompts}]
            if prompts
            else []
        )
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(
        n_clusters=None, distance_threshold=0.75, metric="cosine", linkage="average"
    ).fit_predict(vectors.numpy())
    clusters = []
    for label, size in Counter(labels.tolist()).most_common():
        if size < min_size:
            continue
        members = [i for i, member in enumerate(labels) if member == label]
        centre = vectors[members].mean(dim=0)
        typical = sorted(members, key=lambda i: -float(vectors[i] @ centre))[:examples]
        texts = [prompts[i] for i in members]
        clusters.append(
            {"size": size, "label": _label(texts, train_words, train_total), "examples": [prompts[i] for i in typical]}
        )
    return clusters


WORD = re.compile(r"[a-zA-Z][a-zA-Z'-]{2,}")


def _words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text) if w.lower() not in STOPWORDS]


def _label(texts: list[str], train_words: Counter[str], train_total: int) -> str:
    """The two words most over-represented in these texts against the train prompts."""
    counts = Counter(w for t in texts for w in set(_words(t)))
    total = len(texts)
    score = {w: (c / total) / ((train_words[w] + 1) / (train_total + 1)) * math.log1p(c) for w, c in counts.items()}
    return " ".join(sorted(score, key=lambda w: -score[w])[:2]) or "(no words)"


def drift(train_prompts: list[str], recent_prompts: list[str], max_unlike: float) -> dict[str, Any]:
    """How many recent prompts lie beyond the train split's own 95th percentile of nearest-neighbour distance."""
    import random

    import numpy as np

    from afina.rag.index import embed

    if len(train_prompts) > MAX_TRAIN_PROMPTS:
        train_prompts = random.Random(0).sample(train_prompts, MAX_TRAIN_PROMPTS)
    train_vectors = embed(train_prompts).cpu()
    threshold = float(np.percentile(nearest_distances(train_vectors, train_vectors, exclude_self=True).numpy(), 95))
    vectors = embed(recent_prompts).cpu()
    distances = nearest_distances(vectors, train_vectors)
    far = [i for i, d in enumerate(distances.tolist()) if d > threshold]
    share = len(far) / len(recent_prompts)
    train_words = Counter(w for t in train_prompts for w in set(_words(t)))
    topics = new_topics(
        [recent_prompts[i] for i in far],
        vectors[far],
        train_words,
        len(train_prompts),
        min_size=max(2, math.ceil(0.05 * len(far))),
    )
    return {
        "train_prompts": len(train_prompts),
        "recent_prompts": len(recent_prompts),
        "distance_threshold": round(threshold, 4),
        "expected_share": EXPECTED_SHARE,
        "share_unlike_train": round(share, 4),
        "unlike_train": len(far),
        "max_unlike": max_unlike,
        "median_distance": round(float(distances.median()), 4),
        "drifted": share > max_unlike,
        "new_topics": topics[:8],
    }


def monitor(
    log_dir: str | Path,
    run_root: str | Path,
    recent_days: float | None = None,
    max_unlike: float = 0.2,
    bucket: str = "auto",
) -> dict[str, Any]:
    """The monitoring report of a served run (see the module docstring); written to <run>/monitor/report.json."""
    log_dir, run = Path(log_dir), RunDir(Path(run_root))
    requests, feedback = read_requests(log_dir)
    train_rows = read_jsonl(run.require(run.split_path("train"), "prepare"))
    train_prompts = [p for p in (prompt_text(r) for r in train_rows) if p.strip()]
    if not train_prompts:
        raise DataError(f"{run.split_path('train')}: no prompts to compare the traffic with")
    first, last = requests[0]["_time"], requests[-1]["_time"]
    span = last - first
    if bucket == "auto":
        bucket = "day" if span > timedelta(days=3) else "hour"
    # recent: the last `recent_days`, or the later half of the log's time span
    cutoff = last - timedelta(days=recent_days) if recent_days else first + span / 2
    recent = [r for r in requests if r["_time"] >= cutoff] or requests
    earlier = [r for r in requests if r["_time"] < cutoff]
    recent_prompts = [p for p in (prompt_text(r) for r in recent) if p.strip()]
    report: dict[str, Any] = {
        "logs": str(log_dir),
        "run": str(run.root),
        "requests": len(requests),
        "first": first.isoformat(),
        "last": last.isoformat(),
        "recent": {"from": cutoff.isoformat(), "requests": len(recent)},
        "traffic": traffic(requests, feedback, bucket),
        "bucket": bucket,
        "drift": drift(train_prompts, recent_prompts, max_unlike),
        "answers": {
            "train": answer_stats([a for a in (answer_text(r) for r in train_rows) if a]),
            "earlier": answer_stats([r.get("answer") or "" for r in earlier]) if earlier else None,
            "recent": answer_stats([r.get("answer") or "" for r in recent]),
        },
        "feedback": feedback_summary(recent, earlier, feedback),
    }
    report["verdict"], report["retrain"] = verdict(report)
    write_json_atomic(run.root / "monitor" / "report.json", report)
    return report


def feedback_summary(recent, earlier, feedback) -> dict[str, Any]:
    def part(rows):
        notes = [feedback[r["id"]] for r in rows if r["id"] in feedback]
        ratings = [n["rating"] for n in notes if n.get("rating") is not None]
        return {
            "rated": len(ratings),
            "negative_share": round(sum(r < 0 for r in ratings) / len(ratings), 4) if ratings else None,
            "corrections": sum(1 for n in notes if n.get("correction")),
        }

    return {"recent": part(recent), "earlier": part(earlier) if earlier else None}


def verdict(report: dict[str, Any]) -> tuple[str, bool]:
    """One sentence: retrain or not, with the numbers behind it."""
    d, answers, fb = report["drift"], report["answers"], report["feedback"]
    reasons = []
    if d["drifted"]:
        reason = (
            f"{d['share_unlike_train']:.0%} of the recent prompts ({d['unlike_train']} of {d['recent_prompts']}) are "
            f"unlike the training data (beyond its own 95th-percentile distance; expected ~5%, limit "
            f"{d['max_unlike']:.0%})"
        )
        if d["new_topics"]:
            top = d["new_topics"][0]
            reason += (
                f", largest new topic: '{top['label']}' ({top['size']} prompts, e.g. \"{top['examples'][0][:80]}\")"
            )
        reasons.append(reason)
    before = answers["earlier"] or answers["train"]
    now = answers["recent"]
    if (
        before.get("refusal_rate") is not None
        and now.get("refusal_rate") is not None
        and now["refusal_rate"] - before["refusal_rate"] > 0.1
    ):
        reasons.append(f"refusals rose from {before['refusal_rate']:.0%} to {now['refusal_rate']:.0%}")
    if (
        before.get("answer_words")
        and now.get("answer_words")
        and abs(now["answer_words"] / before["answer_words"] - 1) > 0.5
    ):
        reasons.append(f"answers changed length from {before['answer_words']:.0f} to {now['answer_words']:.0f} words")
    neg_now, neg_before = fb["recent"]["negative_share"], (fb["earlier"] or {}).get("negative_share")
    if neg_now is not None and neg_before is not None and neg_now - neg_before > 0.15 and fb["recent"]["rated"] >= 5:
        reasons.append(f"negative ratings rose from {neg_before:.0%} to {neg_now:.0%}")
    if reasons:
        return "retrain recommended: " + "; ".join(reasons), True
    return (
        f"no retraining needed: {d['share_unlike_train']:.0%} of the recent prompts are unlike the training data "
        f"(limit {d['max_unlike']:.0%}), answers and feedback steady"
    ), False


def format_monitor(report: dict[str, Any]) -> str:
    lines = [
        f"{report['requests']} requests from {report['first']} to {report['last']}; "
        f"recent: {report['recent']['requests']} "
        f"since {report['recent']['from']}",
        f"{'period':<17} {'requests':>8} {'p50 s':>7} {'p95 s':>7} "
        f"{'feedback':>8} {'rating':>6} {'fixes':>5} {'words':>6} {'refusals':>8}",
    ]
    for t in report["traffic"]:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(
            f"{t['period']:<17} {t['requests']:>8} {fmt(t['latency_p50_s'], '7.3f'):>7} "
            f"{fmt(t['latency_p95_s'], '7.3f'):>7} "
            f"{t['feedback_rate']:>8.0%} {fmt(t['mean_rating'], '6.2f'):>6} {t['corrections']:>5} "
            f"{fmt(t['answer_words'], '6.1f'):>6} {fmt(t['refusal_rate'], '8.0%'):>8}"
        )
    d = report["drift"]
    lines.append(
        f"drift: {d['share_unlike_train']:.0%} of {d['recent_prompts']} recent prompts beyond the train split's "
        f"95th-percentile distance {d['distance_threshold']:.3f} (median distance {d['median_distance']:.3f})"
    )
    for topic in d["new_topics"]:
        lines.append(
            f"  new topic '{topic['label']}' ({topic['size']} prompts): "
            + " | ".join(e[:60] for e in topic["examples"])
        )
    lines.append(report["verdict"])
    return "\n".join(lines)
