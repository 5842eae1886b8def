"""The everyday toolkit, each piece against torch's own: schedules driven by hand, optimizers,
losses, presets, EMA, MixUp/CutMix, data sources, seeding, determinism, init, model summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from launcher.config import ConfigError, TrainConfig
from launcher.data.batch import describe
from launcher.data.loader import SplitLoader
from launcher.data.spec import image_folder
from launcher.optim import losses, optimizers, schedules
from launcher.optim.groups import Group, Schedule, assign_groups, build_optimizer, lr_multipliers
from launcher.optim.regularization import EMA, batch_mix
from launcher.presets import eval_transform, normalize, train_transform
from launcher.runtime.distributed import configure_backends
from launcher.train.modeling import init_weights, model_summary

# ---- schedules: ours (stepped per optimizer step) vs torch's (stepped as a script would) ----------

BASE, STEPS_PER_EPOCH, EPOCHS = 0.1, 7, 6


def our_lrs(schedule, total=STEPS_PER_EPOCH * EPOCHS, base=BASE) -> list[float]:
    """The LR of each optimizer step, as the loop drives LambdaLR."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    groups = [type("PG", (), {"lr": base, "starts_at": 0, "in_optimizer": True})()]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multipliers(groups, schedule, total, STEPS_PER_EPOCH))
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def torch_lrs(make, per_epoch: bool) -> list[float]:
    """torch's scheduler stepped by hand, once per epoch or once per optimizer step, as a script would."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE)
    sched = make(opt)
    lrs = []
    for _ in range(EPOCHS if per_epoch else EPOCHS * STEPS_PER_EPOCH):
        lrs += [opt.param_groups[0]["lr"]] * (STEPS_PER_EPOCH if per_epoch else 1)
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            schedules.StepLR(2, gamma=0.5),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        ),
        (
            schedules.MultiStepLR([1, 4], gamma=0.3),
            lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1, 4], gamma=0.3),
        ),
        (schedules.ExponentialLR(0.8), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8)),
        (
            schedules.LambdaLR(lambda e: 1 / (1 + e)),
            lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
        ),
        (
            schedules.CosineAnnealingLR(t_max=4, eta_min=0.01, interval="epoch"),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.01),
        ),
    ],
)
def test_epoch_schedules_change_only_at_epoch_ends_as_torch_stepped_per_epoch(ours, theirs):
    assert our_lrs(ours) == pytest.approx(torch_lrs(theirs, per_epoch=True), rel=1e-9)


def test_cosine_annealing_per_step_with_eta_min_matches_torch():
    total = STEPS_PER_EPOCH * EPOCHS
    ours = our_lrs(schedules.CosineAnnealingLR(eta_min=0.005))  # t_max 0: the whole run
    theirs = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=0.005), False
    )
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_warmup_in_front_of_any_schedule_matches_torch_linear_chained():
    ours = our_lrs(schedules.warmup(schedules.ExponentialLR(0.95, interval="step"), 5))
    theirs = torch_lrs(
        lambda o: torch.optim.lr_scheduler.ChainedScheduler(
            [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / 6, total_iters=5),
                torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
            ]
        ),
        per_epoch=False,
    )
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours[0] == pytest.approx(BASE / 6) and ours[4] == pytest.approx(BASE * 5 / 6 * 0.95**4)


def test_plateau_follows_torch_reduce_on_plateau_after_each_evaluation_and_resumes():
    metrics = [1.0, 0.9, 0.9, 0.95, 0.91, 0.5, 0.6, 0.7, 0.8]
    ours = schedules.Plateau("val/loss", "min", factor=0.5, patience=1)
    at = ours.bind(steps_per_epoch=1, total_steps=1, base_lr=BASE)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    seen = []
    for i, value in enumerate(metrics):
        ours.after_evaluation({"val/loss": value})
        theirs.step(value)
        assert BASE * at(i) == pytest.approx(opt.param_groups[0]["lr"]), i
        seen.append(opt.param_groups[0]["lr"])
        if i == 4:  # a checkpoint here, restored into a fresh schedule
            restored = schedules.Plateau("val/loss", "min", factor=0.5, patience=1)
            restored.load_state_dict(ours.state_dict())
            ours, at = restored, restored.bind(steps_per_epoch=1, total_steps=1, base_lr=BASE)
    assert len(set(seen)) >= 3  # it did reduce, twice
    with pytest.raises(ConfigError, match="watches val/top1, which evaluation does not report"):
        schedules.Plateau("val/top1").after_evaluation({"val/loss": 1.0})


def test_config_names_a_schedule_and_its_fields():
    cfg = TrainConfig(lr_schedule="multistep", lr_milestones=(2, 4), lr_gamma=0.5, warmup_steps=3)
    built = schedules.from_config(cfg)
    assert isinstance(built, schedules.Warmup) and built.inner == schedules.MultiStepLR((2, 4), 0.5)
    assert isinstance(
        schedules.from_config(TrainConfig(lr_schedule="plateau", lr_plateau_metric="val/top1")),
        schedules.Plateau,
    )
    assert (
        schedules.from_config(TrainConfig(lr_schedule="plateau", lr_plateau_metric="val/top1")).mode == "max"
    )
    with pytest.raises(ConfigError, match="--lr_schedule=multistep needs --lr_milestones"):
        schedules.from_config(TrainConfig(lr_schedule="multistep"))


# ---- optimizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, cls",
    [
        ("sgd", dict(momentum=0.9, nesterov=True), torch.optim.SGD),
        ("adam", {}, torch.optim.Adam),
        ("adamw", {}, torch.optim.AdamW),
        ("rmsprop", dict(momentum=0.5), torch.optim.RMSprop),
        ("adagrad", {}, torch.optim.Adagrad),
    ],
)
def test_optimizers_by_name_keep_per_group_weight_decay_and_step_as_torch(name, kwargs, cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    reference = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    reference.load_state_dict(model.state_dict())
    schedule = Schedule(
        groups=[Group("head", ["1"], lr_scale=2.0, weight_decay=0.0), Group("rest")],
        optimizer=optimizers.optimizer(name, **kwargs),
    )
    ours = build_optimizer(schedule, assign_groups(model, schedule, lr=0.01, weight_decay=0.1))
    assert type(ours) is cls
    assert [(g["lr"], g["weight_decay"]) for g in ours.param_groups] == [(0.02, 0.0), (0.01, 0.1)]
    theirs = cls(
        [
            dict(params=list(reference[1].parameters()), lr=0.02, weight_decay=0.0),
            dict(params=list(reference[0].parameters()), lr=0.01, weight_decay=0.1),
        ],
        **kwargs,
    )
    x = torch.randn(8, 4)
    for _ in range(3):
        for net, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_optimizer_mistakes_are_named():
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'; choose one of sgd, adam"):
        optimizers.optimizer("lamb")
    with pytest.raises(ConfigError, match="optimizer adam takes no argument 'momentum'"):
        optimizers.optimizer("adam", momentum=0.9)
    with pytest.raises(ConfigError, match="nesterov SGD needs momentum > 0"):
        optimizers.from_config(TrainConfig(optimizer="sgd", momentum=0.0, nesterov=True))


# ---- losses -------------------------------------------------------------------------------------


def test_losses_equal_torch_modules():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    weights = [1.0, 2.0, 0.5]
    ce = losses.loss("cross_entropy", class_weights=weights, label_smoothing=0.1)
    assert ce(logits, targets) == pytest.approx(
        float(nn.CrossEntropyLoss(weight=torch.tensor(weights), label_smoothing=0.1)(logits, targets))
    )
    soft = F.one_hot(targets, 3).float() * 0.8 + 0.2 / 3
    assert losses.loss("cross_entropy")(logits, soft) == pytest.approx(
        float(nn.CrossEntropyLoss()(logits, soft))
    )
    log_probs = logits.log_softmax(1)
    assert losses.loss("nll", class_weights=weights)(log_probs, targets) == pytest.approx(
        float(nn.NLLLoss(weight=torch.tensor(weights))(log_probs, targets))
    )
    multi_hot = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 0], [1, 0, 0]]).float()
    assert losses.loss("bce_with_logits")(logits, multi_hot) == pytest.approx(
        float(nn.BCEWithLogitsLoss()(logits, multi_hot))
    )
    assert losses.loss("bce_with_logits")(logits, targets) == pytest.approx(
        float(nn.BCEWithLogitsLoss()(logits, F.one_hot(targets, 3).float()))
    )
    outputs, values = torch.randn(6, 1), torch.randn(6)
    assert losses.loss("mse")(outputs, values) == pytest.approx(float(nn.MSELoss()(outputs[:, 0], values)))
    assert losses.loss("l1")(outputs, values) == pytest.approx(float(nn.L1Loss()(outputs[:, 0], values)))


def test_loss_mistakes_are_named():
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        losses.loss("hinge")
    with pytest.raises(ConfigError, match="--label_smoothing applies to cross_entropy only"):
        losses.loss("mse", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="2 class weights for a model with 3 outputs"):
        losses.loss("cross_entropy", class_weights=[1.0, 2.0])(torch.randn(2, 3), torch.tensor([0, 1]))


# ---- presets, EMA, MixUp/CutMix ------------------------------------------------------------------


def test_presets_crop_flip_and_normalize_as_configured():
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    torch.manual_seed(0)
    out = train_transform(24, scale=(0.5, 1.0), hflip=1.0, color_jitter=0.3, rotation=10)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    first, second = eval_transform(32)(image), eval_transform(32)(image)
    assert first.shape == (3, 32, 32) and torch.equal(first, second)  # no randomness in evaluation
    mirrored = train_transform(40, scale=(1.0, 1.0), hflip=1.0)(image.resize((40, 40)))
    assert torch.equal(mirrored, torch.from_numpy(np.array(image.resize((40, 40)))).permute(2, 0, 1).flip(-1))
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(
        normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))(batch)[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5])
    )


def test_ema_follows_the_weights_with_warmed_up_decay():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    ema.update_parameters(model)  # the first update copies
    for n in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model(torch.randn(4, 3))  # BatchNorm statistics move too
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        ema.update_parameters(model)
    for e, p in zip(expected, ema.module.parameters()):
        assert torch.allclose(e, p)
    # integer buffers follow the model
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)  # float buffers are averaged


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_make_probabilities_over_the_classes(mixup, cutmix):
    torch.manual_seed(0)
    mix = batch_mix(mixup, cutmix, num_classes=4)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    mixed, soft = mix(images, labels)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft.argmax(1) == labels).float().mean() >= 0.5 or (soft.max(1).values < 1).all()
    assert batch_mix(0.0, 0.0, 4) is None
    with pytest.raises(ConfigError, match="need the number of classes"):
        batch_mix(mixup or 0.2, cutmix, None)


# ---- data sources and seeding ---------------------------------------------------------------------


def write_folder(root, classes=("cat", "dog", "fox"), per_class=6):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((10, 12, 3), 40 * c + i, dtype=np.uint8)).save(root / name / f"{i}.png")


def keys_of(split: SplitLoader, epoch: int) -> list[str]:
    return [k for batch in split.loader(epoch) for k in batch.keys]


def test_image_folder_is_split_across_ranks_and_reshuffled_each_epoch(tmp_path):
    write_folder(tmp_path / "train")
    dataset = image_folder(str(tmp_path / "train"), eval_transform(8))
    assert dataset.classes == ["cat", "dog", "fox"]
    ranks = [
        SplitLoader(dataset, rank=r, world=2, seed=1, batch_size=3, num_workers=0, training=True)
        for r in (0, 1)
    ]
    epoch0 = [keys_of(r, 0) for r in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == 9 and not set(epoch0[0]) & set(epoch0[1])
    assert set(epoch0[0]) | set(epoch0[1]) == {str(i) for i in range(18)}
    assert keys_of(ranks[0], 1) != epoch0[0] and keys_of(ranks[0], 0) == epoch0[0]
    with pytest.raises(ConfigError, match="image folder .*missing: .*one sub-directory of images per class"):
        image_folder(str(tmp_path / "missing"))


def test_a_torchvision_dataset_class_is_a_data_source():
    from torchvision.datasets import FakeData
    from torchvision.transforms import v2

    dataset = FakeData(size=20, image_size=(3, 8, 8), num_classes=4, transform=v2.PILToTensor())
    ranks = [
        SplitLoader(dataset, rank=r, world=2, seed=0, batch_size=5, num_workers=0, training=False)
        for r in (0, 1)
    ]
    batches = [b for r in ranks for b in r.loader(0)]
    assert sum(len(b.keys) for b in batches) == 20 and batches[0].data[0].shape == (5, 3, 8, 8)
    assert batches[0].data[1].dtype == torch.int64


class NumpyNoise(Dataset):
    """Augmentation drawn from numpy's global RNG, as many hand-written transforms do."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor([np.random.rand()]), 0


@pytest.mark.parametrize("workers", [0, 2])
def test_seed_fixes_numpy_augmentation_in_workers_and_main_process(workers):
    def draws(seed):
        from accelerate.utils import set_seed

        set_seed(seed)
        split = SplitLoader(
            NumpyNoise(),
            rank=0,
            world=1,
            seed=seed,
            batch_size=4,
            num_workers=workers,
            training=True,
            batches_per_epoch=4,
        )
        return torch.cat([b.data[0] for b in split.loader(0)]).flatten().tolist()

    assert draws(3) == draws(3) and draws(3) != draws(4)


def test_deterministic_and_cudnn_benchmark_fields_set_torch():
    try:
        configure_backends(TrainConfig(deterministic=True))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        configure_backends(TrainConfig(cudnn_benchmark=True))
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        configure_backends(TrainConfig())
    with pytest.raises(ConfigError, match="--deterministic and --cudnn_benchmark contradict"):
        TrainConfig(deterministic=True, cudnn_benchmark=True).validate()


# ---- model: init and summary ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme", ["kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "trunc_normal"]
)
def test_weight_init_reinitialises_conv_and_linear_layers(scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Flatten(), nn.Linear(64, 256))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(5.0)
    assert init_weights(model, scheme) == 2
    conv, norm, linear = model[0], model[1], model[3]
    assert not conv.bias.any() and not linear.bias.any()
    assert torch.equal(norm.weight.detach(), torch.ones(64)) and not norm.bias.any()
    fan_in, fan_out = 64, 256
    expected_std = {
        "kaiming_normal": math.sqrt(2 / fan_out),
        "kaiming_uniform": math.sqrt(2 / fan_in),
        "xavier_normal": math.sqrt(2 / (fan_in + fan_out)),
        "xavier_uniform": math.sqrt(2 / (fan_in + fan_out)),
        "trunc_normal": 0.02,
    }[scheme]
    assert float(linear.weight.detach().std()) == pytest.approx(expected_std, rel=0.1)
    with pytest.raises(ConfigError, match="unknown --weight_init=orthogonal"):
        init_weights(model, "orthogonal")


def test_model_summary_counts_trainable_and_frozen_per_module_and_the_output_shape():
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 3))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(8, 5))
    model.stem.requires_grad_(False)
    lines = model_summary(model, "input (N, 3, 12, 12) -> output (N, 5)")
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert rows["stem"] == ["224", "0", "224", f"{224 * 4 / 2**20:.2f}"]
    assert rows["head"] == ["45", "45", "0", "0.00"] and "pool" not in rows
    assert rows["total"] == ["269", "45", "224", f"{269 * 4 / 2**20:.2f}"]
    assert lines[-1] == "  input (N, 3, 12, 12) -> output (N, 5)"
    assert describe(torch.zeros(1, 3, 12, 12)) == "(N, 3, 12, 12)" and describe(torch.zeros(4)) == "(N,)"
    assert (
        describe({"ids": torch.zeros(2, 7), "pair": (torch.zeros(2), [1, 2])})
        == "{ids: (N, 7), pair: ((N,), (int, int))}"
    )


def test_predict_adds_a_placeholder_target_where_a_sample_has_only_its_inputs():
    from launcher.commands.inference import with_placeholder_target

    tokens = torch.tensor([3, 4])
    pair = with_placeholder_target((tokens, 2), ((torch.tensor([1]), 1), 5))  # ((tokens, length), label)
    assert pair[0] == (tokens, 2) and pair[1] == 0 and type(pair[1]) is int
    features = with_placeholder_target(torch.ones(3), (torch.zeros(3), torch.tensor(2.5)))
    assert torch.equal(features[1], torch.tensor(0.0)) and features[1].dtype == torch.float32
    complete = (torch.ones(3), torch.tensor(1.0))
    assert with_placeholder_target(complete, (torch.zeros(3), torch.tensor(2.5))) is complete
    labelled = with_placeholder_target(
        {"input_ids": tokens}, {"input_ids": tokens, "labels": torch.tensor([7, 8])}
    )
    assert torch.equal(labelled["labels"], torch.tensor([0, 0])) and labelled["input_ids"] is tokens


def test_predict_reads_files_of_inputs_one_per_line(tmp_path):
    from launcher.commands.inference import gather_inputs

    lines = tmp_path / "inputs.txt"
    lines.write_text("-1,2\n\n3,4\r\n")
    assert gather_inputs(["5,6", str(lines)], str(lines), files_of_inputs=True) == [
        "5,6",
        "-1,2",
        "3,4",
        "-1,2",
        "3,4",
    ]
    assert gather_inputs([str(lines)], files_of_inputs=False) == [str(lines)]  # an image recipe's path
    with pytest.raises(ConfigError, match="cannot read the inputs in .*missing.txt"):
        gather_inputs([], str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="no inputs in .*blank.txt; give one input per line"):
        gather_inputs([], str(tmp_path / "blank.txt"))
