"""Video data (training/video.py) on the generated moving-digits task (demo/motion.py) in both layouts: clip
sampling, the checks up front, multi-view evaluation, training and delta round trips on a tiny Video Swin
(torchvision's class, shrunk) and a tiny VideoMAE (transformers, from a directory on the command line), a
two-run video study and --shots on videos."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.models.video.swin_transformer import SwinTransformer3d

import petl_surgery as ps
from petl_surgery import cli
from petl_surgery.demo.motion import AXES, motion_clip, write_motion_dataset
from petl_surgery.training import DataError, fit
from petl_surgery.training import video as V

FRAMES, STRIDE, SIZE = 4, 2, 16
PER_CLASS = {"train": 2, "val": 1, "test": 1}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """mp4 files, space-separated lists: 4 directions x (2 train, 1 val, 1 test), 8 frames of 16 px."""
    return write_motion_dataset(tmp_path_factory.mktemp("videos"), per_class=PER_CLASS, frames=8, canvas=16, scale=1)


@pytest.fixture(scope="module")
def frame_folders(tmp_path_factory) -> Path:
    """The same task as mmaction2 frame folders with comma-separated lists."""
    return write_motion_dataset(tmp_path_factory.mktemp("frames"), per_class=PER_CLASS, kind="frames", frames=8,
                                canvas=16, scale=1, separator=",")


def spec(**changes) -> V.ClipSpec:
    return V.ClipSpec(**{"frames": FRAMES, "stride": STRIDE, "size": SIZE, **changes})


def tiny_swin3d(classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2, 2],
                             stochastic_depth_prob=0.0, num_classes=classes)


# -- sampling -----------------------------------------------------------------------------------------------


def test_a_clip_takes_every_stride_th_frame_from_its_start():
    assert V.clip_indices(20, 4, 3, start=5) == [5, 8, 11, 14]


def test_a_short_video_keeps_the_stride_from_frame_0_and_repeats_its_last_frame():
    assert V.clip_indices(5, 4, 2, start=0) == [0, 2, 4, 4]
    assert V.test_starts(5, span=7, clips=3) == [0, 0, 0]
    assert V.random_start(5, 7, random.Random(0)) == 0


def test_test_views_are_evenly_spaced_from_the_first_to_the_last_start_that_fits():
    assert V.test_starts(20, span=7, clips=3) == [0, 6, 13]
    assert V.test_starts(20, span=7, clips=1) == [6]
    assert V.test_starts(7, span=7, clips=2) == [0, 0]


def test_training_starts_stay_where_the_clip_fits():
    rng = random.Random(0)
    starts = {V.random_start(10, 7, rng) for _ in range(200)}
    assert starts == {0, 1, 2, 3}


def test_three_crops_cover_the_ends_and_the_centre_of_the_longer_side():
    clip = torch.arange(16 * 24, dtype=torch.float32).view(1, 1, 16, 24).expand(3, 2, 16, 24)
    crops = V.test_crops(clip, 16, 3)
    assert [c.shape[-2:] for c in crops] == [torch.Size([16, 16])] * 3
    assert torch.equal(crops[0], clip[..., :16]) and torch.equal(crops[1], clip[..., 4:20])
    assert torch.equal(crops[2], clip[..., 8:])


def test_the_generated_task_needs_time(tmp_path):
    """Every frame of a 'right' clip also occurs in some 'left' clip: one frame cannot tell the class."""
    digit = torch.ones(8, 8).numpy() * 16
    right = motion_clip(digit, AXES["right"], random.Random(0), frames=8, canvas=16, scale=1)
    left = motion_clip(digit, AXES["left"], random.Random(0), frames=8, canvas=16, scale=1)
    assert sorted(map(bytes, right)) == sorted(map(bytes, left))
    assert not (right == left).all()


@pytest.mark.parametrize("layout", ["videos", "frame_folders"])
def test_both_layouts_decode_the_frames_that_were_written(layout, request):
    root = request.getfixturevalue(layout)
    first = (root / "train.csv").read_text().split("\n")[0]
    path = first.split(",")[0] if "," in first else first.split()[0]
    frames = V.read_frames(root / path, [0, 3, 7])
    assert frames.shape == (3, 16, 16, 3) and frames.dtype == torch.uint8
    rgb = V.read_frames(root.parent / (root.name) / path, [3])[0].float()
    assert rgb.max() > 150 and rgb.mean() < 100  # a bright digit on a dark canvas (mpeg4 is lossy)


def test_video_and_frame_folder_clips_agree_to_the_codec_s_loss(videos, frame_folders):
    a = V.video_training_data(str(videos), spec(aug="none"))
    b = V.video_training_data(str(frame_folders), spec(aug="none"))
    assert a.train.samples[0][1] == b.train.samples[0][1]
    assert a.train.lengths == b.train.lengths == [8] * 8
    x, y = a.train[0]
    assert x.shape == (3, FRAMES, SIZE, SIZE)


# -- the checks up front ------------------------------------------------------------------------------------


def copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(root, target)
    return target


def test_a_missing_video_is_named(videos, tmp_path):
    data = copy(videos, tmp_path)
    (data / "train" / "left_001.mp4").unlink()
    with pytest.raises(DataError, match=r"video .*train/left_001.mp4 does not exist"):
        V.video_training_data(str(data), spec())


def test_an_unreadable_video_is_named(videos, tmp_path):
    data = copy(videos, tmp_path)
    (data / "train" / "up_000.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(DataError, match=r"cannot read the video .*train/up_000.mp4"):
        V.video_training_data(str(data), spec())


def test_a_frame_folder_without_frames_is_named(frame_folders, tmp_path):
    data = copy(frame_folders, tmp_path)
    for image in (data / "train" / "down_000").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"frame folder .*train/down_000 holds no images"):
        V.video_training_data(str(data), spec())


def test_a_frame_folder_with_fewer_images_than_listed_is_named(frame_folders, tmp_path):
    data = copy(frame_folders, tmp_path)
    (data / "train" / "down_001" / "img_00008.png").unlink()
    with pytest.raises(DataError, match=r"train/down_001 holds 7 images, its list line says 8"):
        V.video_training_data(str(data), spec())


def test_a_label_outside_the_model_s_classes_is_named(videos):
    with pytest.raises(DataError, match=r"test/up_000.mp4: label 3 is out of range for the model's 3 classes"):
        V.video_evaluation_data(str(videos), spec(), classes=3)


def test_the_command_line_names_a_bad_video_in_one_line_before_training(videos, tmp_path, capsys):
    data = copy(videos, tmp_path)
    (data / "train" / "right_000.mp4").write_bytes(b"\x00" * 64)
    out = tmp_path / "delta.safetensors"
    code = cli.main(["train", "torchvision:swin3d_t", "--format", "video", "--data", str(data), "-m", "lora",
                     "--image-size", "16", "--frames", "2", "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and "right_000.mp4" in error and not out.exists()


# -- multi-view evaluation ----------------------------------------------------------------------------------


def test_multi_view_evaluation_is_the_average_of_the_views_softmax(frame_folders):
    model = tiny_swin3d().eval()
    views, _, _ = V.video_evaluation_data(str(frame_folders), spec(clips=2, crops=3))
    loader = torch.utils.data.DataLoader(views, batch_size=3)
    with torch.no_grad():
        batched = torch.cat([V.ViewAverage(model)(x) for x, _ in loader])
        one_by_one = []
        for i in range(len(views)):
            probabilities = [model(view[None]).softmax(-1)[0] for view in views.views(i)]
            one_by_one.append(torch.stack(probabilities).mean(0).log())
    assert len(views.views(0)) == 6
    torch.testing.assert_close(batched, torch.stack(one_by_one), rtol=1e-5, atol=1e-6)


def test_the_views_are_the_evenly_spaced_clips_in_three_crops(frame_folders):
    views, _, _ = V.video_evaluation_data(str(frame_folders), spec(clips=2, crops=3, stride=1))
    path = frame_folders / views.samples[0][0]
    frames = V._normalise(V.read_frames(path, [4, 5, 6, 7]), views.spec)  # the second clip: starts 0 and 4
    torch.testing.assert_close(views.views(0)[4], V.test_crops(frames, SIZE, 3)[1])


# -- training and delta round trips -------------------------------------------------------------------------


def test_tiny_video_swin_trains_with_bapat_and_its_delta_reloads(videos, tmp_path):
    data = V.video_training_data(str(videos), spec(), val="val")
    model = ps.apply(tiny_swin3d(), "bapat", mid_dim=8)
    records = fit(model, data.train, data.val, epochs=2, lr=1e-2, batch_size=4, seed=0)
    assert len(records) == 2 and records[-1].val_accuracy is not None
    ps.save(model, tmp_path / "delta.safetensors")
    fresh = ps.load(tiny_swin3d(), tmp_path / "delta.safetensors")
    model.eval(), fresh.eval()
    x = torch.stack([data.val[i][0] for i in range(2)])
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def write_videomae(path: Path, **changes) -> Path:
    import transformers

    config = transformers.VideoMAEConfig(
        image_size=SIZE, patch_size=8, num_frames=FRAMES, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=4, attn_implementation="sdpa", **changes,
    )
    torch.manual_seed(0)
    transformers.VideoMAEForVideoClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory) -> Path:
    return write_videomae(tmp_path_factory.mktemp("videomae"))


@pytest.mark.parametrize("method", ["bapat", "patt", "adapter", "lora"])
def test_tiny_videomae_trains_from_the_command_line_and_evaluates_its_delta(method, videomae_dir, videos, tmp_path,
                                                                              capsys):
    out = tmp_path / "delta.safetensors"
    common = [f"hf:{videomae_dir}", "--pretrained", "--format", "video", "--data", str(videos), "--frame-stride", "2"]
    assert cli.main(["train", *common, "-m", method, "--epochs", "1", "--batch-size", "4", "--val", "val",
                     "--out", str(out)]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["frames"] == FRAMES and log["frame_stride"] == 2 and log["image_size"] == SIZE
    result = tmp_path / "result.json"
    assert cli.main(["evaluate", *common[:1], str(out), *common[1:], "--test-clips", "2", "--test-crops", "3",
                     "--json", str(result)]) == 0
    report = json.loads(result.read_text())
    assert report["images"] == 4

    # the same numbers from a fresh model with the delta loaded, by the library's own pieces
    from petl_surgery.training import accuracy_report
    from petl_surgery.training.zoo import build_model, parse_model_spec

    model = ps.load(build_model(parse_model_spec(f"hf:{videomae_dir}"), 4, pretrained=True), out)
    views, layout, _ = V.video_evaluation_data(str(videos), spec(clips=2, crops=3))
    again = accuracy_report(V.ViewAverage(model), torch.utils.data.DataLoader(views, batch_size=2), layout.classes)
    assert again["top1"] == report["top1"]


def test_videomae_refuses_a_clip_length_its_position_embeddings_do_not_fit(videomae_dir, videos, tmp_path, capsys):
    code = cli.main(["train", f"hf:{videomae_dir}", "--format", "video", "--data", str(videos), "-m", "lora",
                     "--frames", "6", "--out", str(tmp_path / "d.safetensors")])
    assert code == 2 and "takes clips of 4 frames" in capsys.readouterr().err


def test_shots_draw_k_videos_per_class(videomae_dir, frame_folders, tmp_path):
    out = tmp_path / "delta.safetensors"
    assert cli.main(["train", f"hf:{videomae_dir}", "--format", "video", "--data", str(frame_folders), "-m", "lora",
                     "--shots", "1", "--shot-seed", "3", "--epochs", "1", "--video-aug", "none",
                     "--out", str(out)]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    drawn = log["shot_images"]
    assert log["train_images"] == 4 and len(drawn) == 4
    assert sorted(path.split("/")[1].split("_")[0] for path in drawn) == sorted(AXES)


def test_a_two_run_video_study(videomae_dir, videos, tmp_path):
    from petl_surgery.training import run_study

    grid = {"model": f"hf:{videomae_dir}", "data": str(videos), "format": "video", "epochs": 1, "batch_size": 4,
            "lr": 0.01, "frame_stride": 2, "test_clips": 2, "runs": [{"method": "bapat"}, {"method": "lora"}],
            "shots": [1], "seeds": [0]}
    result = run_study(grid, tmp_path / "study", device="cpu", plot=False, log=lambda line: None)
    assert result.trained == 2 and [row["method"] for row in result.rows] == ["bapat", "lora"]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in result.rows)
    run_log = json.loads(next((tmp_path / "study" / "runs").glob("bapat-*/log.json")).read_text())
    assert run_log["format"] == "video" and run_log["evaluation"]["images"] == 4
    assert run_log["train_images"] == 4 and len(run_log["shot_images"]) == 4  # one video per class


def test_a_user_model_taking_clips_trains_with_the_library_s_video_data(videos):
    class Tiny(torch.nn.Module):  # (B, C, T, H, W) -> logits, blocks of torch's own TransformerEncoderLayer
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Conv3d(3, 16, (2, 8, 8), (2, 8, 8))
            self.blocks = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 2)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))

    torch.manual_seed(0)
    model = ps.apply(Tiny(), "lora")
    data = V.video_training_data(str(videos), spec())
    records = fit(model, data.train, epochs=1, batch_size=4, seed=0)
    assert records[0].train_loss > 0


def test_two_dataloader_workers_decode_what_the_main_process_decodes(videos):
    data = V.video_training_data(str(videos), spec(aug="none"))
    main = torch.cat([x for x, _ in torch.utils.data.DataLoader(data.train, batch_size=4)])
    workers = torch.cat([x for x, _ in torch.utils.data.DataLoader(data.train, batch_size=4, num_workers=2)])
    assert torch.equal(main, workers)


def test_training_clips_without_augmentation_are_the_middle_clip_every_time(videos):
    data = V.video_training_data(str(videos), spec(aug="none"))
    path = videos / data.train.samples[0][0]
    middle = V._normalise(V.read_frames(path, [0, 2, 4, 6]), data.train.spec)  # 8 frames, span 7: start 0
    data2 = V.video_training_data(str(videos), spec(aug="none", stride=1))
    middle2 = V._normalise(V.read_frames(path, [2, 3, 4, 5]), data2.train.spec)  # span 4: start (8 - 4) // 2
    for _ in range(3):
        torch.testing.assert_close(data.train[0][0], V.test_crops(middle, SIZE, 1)[0])
        torch.testing.assert_close(data2.train[0][0], V.test_crops(middle2, SIZE, 1)[0])
