"""What a callback logs besides numbers (launcher/track/media.py) as TensorBoard and metrics.jsonl
hold it, read back; and the digit recipes' worst-classified images callback on a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from launcher import Images, Table
from launcher.track import media
from launcher.train.callbacks import View


def test_images_and_a_table_reach_tensorboard_and_the_metrics_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    chw = torch.linspace(0, 1, 3 * 4 * 5).reshape(3, 4, 5)  # float CHW in [0, 1]
    hwc = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    values = {
        "val/worst": Images([chw, hwc], ["a", "b"]),
        "val/table": Table(["x", "y"], [["1|2", 3], ["z\nw", 4.5]]),
    }
    writer = SummaryWriter(str(tmp_path / "tb"))
    media.to_tensorboard(writer, values, step=7)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val/worst/0", "val/worst/1"]
    assert [(e.step, e.width, e.height) for e in events.Images("val/worst/1")] == [(7, 5, 4)]
    (text,) = events.Tensors("val/table/text_summary")
    assert (
        text.tensor_proto.string_val[0].decode() == "| x | y |\n| --- | --- |\n| 1\\|2 | 3 |\n| z w | 4.5 |"
    )

    written = {key: media.to_json(str(tmp_path), key, value, step=7) for key, value in values.items()}
    assert written["val/table"] == {"columns": ["x", "y"], "rows": [["1|2", 3], ["z\nw", 4.5]]}
    assert written["val/worst"]["captions"] == ["a", "b"]
    first, second = (np.asarray(Image.open(tmp_path / path)) for path in written["val/worst"]["images"])
    assert np.array_equal(second, hwc)
    assert np.array_equal(first, (chw.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def test_log_takes_numbers_of_any_kind_and_refuses_what_no_tracker_shows():
    assert media.normalized({"a": np.float32(0.5), "b": torch.tensor(3), "c": "text"}) == {
        "a": 0.5,
        "b": 3,
        "c": "text",
    }
    with pytest.raises(TypeError, match="'val/list' is a list"):
        media.normalized({"val/list": [1, 2]})


def test_the_worst_classified_images_are_those_whose_label_the_model_finds_least_likely(digits, tmp_path):
    from recipes.convnet_digits_tiny import Config, build_data, build_model, callbacks

    cfg = Config(data_dir=str(digits), output_dir=str(tmp_path))
    (worst,) = callbacks(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    logged: list[dict] = []
    worst.on_evaluate(View(3, 0, model, cfg, str(tmp_path), True, logged.append), {})
    (values,) = logged
    images = values["val/worst"]
    assert len(images.images) == 8 and all(
        i.shape == (3, 8, 8) and i.dtype == torch.uint8 for i in images.images
    )
    # Recomputed from the same first 256 validation samples: the 8 highest losses, most surprising first.
    data = build_data(cfg).val
    with torch.no_grad():
        logits = model(data.batch_transform(worst.images))
    losses = torch.nn.functional.cross_entropy(logits, worst.labels, reduction="none")
    expected = losses.topk(8).indices
    assert all(torch.equal(a, worst.images[i]) for a, i in zip(images.images, expected))
    assert images.captions == [
        f"predicted {int(logits[i].argmax())}, label {int(worst.labels[i])}" for i in expected
    ]
