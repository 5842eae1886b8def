"""The task metrics (launcher/train/metrics.py) against torchmetrics' on the same batches: top-1,
top-5 and the confusion matrix, MSE, MAE and R², token accuracy with ignored positions; in two
processes each rank's sums are all-reduced to the whole split's values; a recipe's own metric
(build_metrics) is updated and computed beside them. torchmetrics is imported in the tests that
use it, so that the spawned ranks do not import it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.train.metrics import TaskMetrics

CPU = torch.device("cpu")


def batches(task: str, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    if task == "classification":
        return [
            (torch.randn(n, 10, generator=generator), torch.randint(0, 10, (n,), generator=generator))
            for n in (7, 16, 3)
        ]
    if task == "regression":
        return [
            (torch.randn(n, 1, generator=generator), torch.randn(n, generator=generator) * 3 + 1)
            for n in (5, 9)
        ]
    targets = torch.randint(0, 12, (2, 4, 6), generator=generator)
    targets[targets % 5 == 0] = -100  # padding
    return [(torch.randn(4, 6, 12, generator=generator), t) for t in targets]


def ours(task: str, data, **kwargs) -> tuple[dict, list | None]:
    metrics = TaskMetrics(task, 12 if task == "language_model" else 10, CPU, **kwargs)
    for outputs, targets in data:
        metrics.update(outputs, targets)
    return metrics.compute(loss=1.5)


def reference(metric, data, transform=lambda o, t: (o, t)) -> float:
    for outputs, targets in data:
        metric.update(*transform(outputs, targets))
    return float(metric.compute())


def test_classification_is_torchmetrics_top1_top5_and_confusion_matrix():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    data = batches("classification")
    values, confusion = ours("classification", data)
    expected = MulticlassConfusionMatrix(10)
    for outputs, targets in data:
        expected.update(outputs.argmax(1), targets)
    assert confusion == expected.compute().tolist()
    assert values["val/top1"] == pytest.approx(
        reference(MulticlassAccuracy(10, average="micro"), data), abs=1e-6
    )
    assert values["val/top5"] == pytest.approx(
        reference(MulticlassAccuracy(10, top_k=5, average="micro"), data), abs=1e-6
    )


def test_regression_is_torchmetrics_mse_mae_and_r2():
    from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

    data = batches("regression")
    values, _ = ours("regression", data)
    flat = lambda o, t: (o.reshape(-1), t)  # noqa: E731 - (N, 1) outputs against (N,) targets
    assert values["val/mse"] == pytest.approx(reference(MeanSquaredError(), data, flat), rel=1e-5)
    assert values["val/mae"] == pytest.approx(reference(MeanAbsoluteError(), data, flat), rel=1e-5)
    assert values["val/r2"] == pytest.approx(reference(R2Score(), data, flat), rel=1e-5)


def test_token_accuracy_skips_ignored_positions_and_perplexity_is_exp_loss():
    from torchmetrics.classification import MulticlassAccuracy

    data = batches("language_model")
    values, _ = ours("language_model", data)
    expected = reference(
        MulticlassAccuracy(12, average="micro", ignore_index=-100),
        data,
        lambda o, t: (o.flatten(0, 1), t.flatten()),
    )
    assert values["val/token_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert values["val/perplexity"] == pytest.approx(torch.tensor(1.5).exp().item())


def test_a_recipe_metric_is_updated_and_computed_beside_the_task_s():
    from torchmetrics.classification import MulticlassF1Score

    data = batches("classification")
    values, _ = ours("classification", data, extra={"f1": MulticlassF1Score(10, average="macro")})
    assert values["val/f1"] == pytest.approx(reference(MulticlassF1Score(10, average="macro"), data))
    assert set(values) == {"val/top1", "val/top5", "val/f1"}


def test_targets_outside_the_classes_are_refused_in_one_line():
    with pytest.raises(
        ValueError,
        match=r"^classification targets must be class indices in \[0, 10\), got values "
        r"from 0 to 10$",
    ):
        TaskMetrics("classification", 10, CPU).update(torch.randn(2, 10), torch.tensor([0, 10]))


TASKS = ("classification", "regression", "language_model")


def _rank(rank: int, store: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    # kept until the group is gone, as the Evaluator keeps its own (launcher/train/metrics.py)
    kept = {task: TaskMetrics(task, 12 if task == "language_model" else 10, CPU) for task in TASKS}
    try:  # rank 0 takes batches 0 and 2, rank 1 batch 1; for the language model rank 1 has none
        results = {}
        for task in TASKS:
            held = batches(task)[rank::2] if task != "language_model" else batches(task)[: 2 - 2 * rank]
            for outputs, targets in held:
                kept[task].update(outputs, targets)
            results[task] = kept[task].compute(loss=1.5)
        queue.put((rank, results))
        queue.close()
        queue.join_thread()  # sent before the group goes away
    finally:
        dist.destroy_process_group()


def test_two_ranks_report_the_whole_split_s_values(tmp_path):
    context = mp.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_rank, args=(rank, str(tmp_path / "store"), queue)) for rank in range(2)]
    for process in ranks:
        process.start()
    results = dict(queue.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    assert [process.exitcode for process in ranks] == [0, 0]
    for task in TASKS:
        whole = ours(task, batches(task))
        for rank in range(2):
            assert results[rank][task][1] == whole[1], (task, rank)
            assert results[rank][task][0] == pytest.approx(whole[0], rel=1e-9), (task, rank)
