"""eval.max_examples picks a seeded random sample of test rows, per task, in file order."""

from afina.eval.sample import sample_test_rows


def test_a_sorted_test_file_is_sampled_across_its_labels():
    rows = [{"id": i, "label": f"intent_{i // 40}"} for i in range(400)]  # sorted by label, 10 labels
    picked = sample_test_rows(rows, 50, seed=3)
    assert len(picked) == 50 and len({r["label"] for r in picked}) >= 8  # the first 50 rows hold only 2 labels
    assert [r["id"] for r in picked] == sorted(r["id"] for r in picked)
    assert sample_test_rows(rows, 50, seed=3) == picked and sample_test_rows(rows, 50, seed=4) != picked
    assert sample_test_rows(rows, None, seed=3) == rows and sample_test_rows(rows, 1000, seed=3) == rows


def test_multi_task_rows_are_sampled_per_task():
    rows = [{"id": i, "task": "qa" if i < 30 else "summary"} for i in range(40)]
    picked = sample_test_rows(rows, 12, seed=0)
    assert sum(r["task"] == "qa" for r in picked) == 12 and sum(r["task"] == "summary" for r in picked) == 10
