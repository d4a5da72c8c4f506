"""Model specs of every zoo on the command line (training/zoo.py): close matches for unknown names, the input
size from the model as built, and one tiny model from torchvision, transformers (a local directory) and
open_clip built and trained by `petl-surgery train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from petl_surgery import cli
from petl_surgery.training.zoo import ModelSpecError, build_model, input_config, parse_model_spec


@pytest.mark.parametrize("spec, message", [
    ("vit_tinyy_patch16_224", "unknown timm model 'vit_tinyy_patch16_224'; close matches: vit_tiny_patch16_224"),
    ("torchvision:swin3dt", "unknown torchvision model 'swin3dt'; close matches: swin3d_t"),
    ("open_clip:ViT-B-322", "unknown open_clip model 'ViT-B-322'; close matches: ViT-B-32"),
    ("hf:/nonexistent/dir", "hf:/nonexistent/dir: no transformers directory there"),
])
def test_an_unknown_spec_is_one_line_with_close_matches(spec, message, capsys):
    assert cli.main(["plan", spec, "-m", "lora"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_prefix_that_is_no_zoo_stays_part_of_a_timm_name():
    with pytest.raises(ModelSpecError, match="unknown timm model 'foo:bar'"):
        parse_model_spec("foo:bar")
    assert parse_model_spec("timm:vit_tiny_patch16_224") == parse_model_spec("timm:vit_tiny_patch16_224")
    assert parse_model_spec("vit_tiny_patch16_224").zoo == "timm"


def test_the_input_size_comes_from_the_model_as_built(image_folder, tmp_path):
    out = tmp_path / "delta.safetensors"
    assert cli.main(["train", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "depth=2",
                     "--data", str(image_folder), "-m", "lora", "--epochs", "1", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["image_size"] == 32


def write_vit_dir(path: Path) -> Path:
    import transformers

    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=7)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}))
    return path


def test_a_transformers_directory_trains_evaluates_and_gives_its_preprocessing(image_folder, tmp_path):
    vit = write_vit_dir(tmp_path / "vit")
    spec = parse_model_spec(f"hf:{vit}")
    model = build_model(spec, 3, pretrained=True)
    config = input_config(model, spec)
    assert (config.size, config.mean, config.std) == (16, (0.1, 0.2, 0.3), (1, 2, 3))
    assert model.get_classifier().out_features == 3
    import transformers  # the directory's weights are those loaded, the head aside

    original = transformers.ViTForImageClassification.from_pretrained(vit)
    assert torch.equal(model.model.vit.embeddings.patch_embeddings.projection.weight,
                       original.vit.embeddings.patch_embeddings.projection.weight)
    out = tmp_path / "delta.safetensors"
    args = [f"hf:{vit}", "--pretrained", "--data", str(image_folder)]
    assert cli.main(["train", *args, "-m", "adapter", "--epochs", "1", "--out", str(out)]) == 0
    assert cli.main(["evaluate", args[0], str(out), *args[1:]]) == 0


def test_without_pretrained_a_transformers_directory_gives_its_config_alone(tmp_path):
    vit = write_vit_dir(tmp_path / "vit")
    torch.manual_seed(1)
    model = build_model(parse_model_spec(f"hf:{vit}"), 3)
    import transformers

    original = transformers.ViTForImageClassification.from_pretrained(vit)
    assert not torch.equal(model.model.vit.embeddings.patch_embeddings.projection.weight,
                           original.vit.embeddings.patch_embeddings.projection.weight)


OPEN_CLIP_ARGS = [
    "--model-arg", 'vision_cfg={"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}',
    "--model-arg", 'text_cfg={"context_length": 4, "vocab_size": 16, "width": 16, "heads": 1, "layers": 1}',
    "--model-arg", "embed_dim=16",
]


def test_an_open_clip_image_tower_trains_with_a_head_and_its_own_preprocessing(image_folder, tmp_path):
    out = tmp_path / "delta.safetensors"
    assert cli.main(["train", "open_clip:ViT-S-32", *OPEN_CLIP_ARGS, "--data", str(image_folder), "-m", "lora",
                     "--epochs", "1", "--out", str(out)]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["image_size"] == 16
    assert cli.main(["evaluate", "open_clip:ViT-S-32", str(out), *OPEN_CLIP_ARGS, "--data", str(image_folder)]) == 0


def test_torchvision_video_swin_trains_on_videos_from_the_command_line(tmp_path):
    from petl_surgery.demo.motion import write_motion_dataset

    data = write_motion_dataset(tmp_path / "videos", per_class={"train": 1, "test": 1}, frames=4, canvas=16, scale=1)
    out = tmp_path / "delta.safetensors"
    common = ["torchvision:swin3d_t", "--format", "video", "--data", str(data), "--image-size", "16", "--frames", "2",
              "--frame-stride", "2"]
    assert cli.main(["train", *common, "-m", "bapat", "--epochs", "1", "--out", str(out)]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["frames"] == 2 and log["image_size"] == 16
    assert cli.main(["evaluate", common[0], str(out), *common[1:]]) == 0


def test_weights_from_a_file_for_another_zoo_load_all_but_a_head_of_another_size(tmp_path):
    from safetensors.torch import save_file

    spec = parse_model_spec("open_clip:ViT-S-32")
    kwargs = {"vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 4, "vocab_size": 16, "width": 16, "heads": 1, "layers": 1}, "embed_dim": 16}
    torch.manual_seed(0)
    source = build_model(spec, 5, model_args=kwargs)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    loaded = build_model(spec, 3, weights=str(tmp_path / "w.safetensors"), model_args=kwargs)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items() if not k.startswith("head."))
    assert loaded.head.out_features == 3
    wrong = build_model(parse_model_spec("torchvision:swin3d_t"), 3).state_dict()
    save_file({k: v.contiguous() for k, v in list(wrong.items())[:3]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelSpecError, match="do not fit open_clip:ViT-S-32"):
        build_model(spec, 3, weights=str(tmp_path / "bad.safetensors"), model_args=kwargs)


def test_plan_counts_the_head_of_a_model_of_another_zoo(capsys):
    assert cli.main(["plan", "torchvision:swin3d_t", "-m", "bapat", "--num-classes", "51"]) == 0
    head = [line for line in capsys.readouterr().out.splitlines() if line.startswith("classifier head")]
    assert head and head[0].split()[-2] == f"{768 * 51 + 51:,}"
