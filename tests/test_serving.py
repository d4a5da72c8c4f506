"""The task server (issue 21, item 4): ``petl-surgery serve`` on loopback, concurrent requests of three tasks
batched together, each answer equal to its task's model alone; bad requests are 4xx with a message; a delta
that does not fit the base is refused before the server starts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from test_tasks import _randomized_task

from petl_surgery.cli import main

MODEL = "vit_small_patch16_224"
# make_vit's base (conftest): what `serve` builds from these arguments and seed 0
MODEL_ARGS = ("img_size=64", "embed_dim=64", "depth=4", "num_heads=2", "num_classes=5")
TASKS = {"pets": ("patt", 3), "cars": ("lora", 4), "birds": ("adapter", 6)}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_command(tasks: dict, port: int) -> list:
    command = [sys.executable, "-m", "petl_surgery", "serve", MODEL, "--port", str(port), "--accelerator", "cpu"]
    command += ["--devices", "1", "--max-batch-size", "8", "--batch-timeout", "0.2"]
    for item in MODEL_ARGS:
        command += ["--model-arg", item]
    for name, path in tasks.items():
        command += ["--task", f"{name}={path}"]
    return command


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    singles, files = {}, {}
    for seed, (name, (method, classes)) in enumerate(TASKS.items()):
        files[name] = folder / f"{name}.safetensors"
        singles[name] = _randomized_task("timm vit", method, classes, seed, files[name])
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(_serve_command(files, port), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the server exited: {(folder / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no /health 200 within 240 s: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, singles
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def test_concurrent_requests_of_three_tasks_each_get_their_tasks_answer(server):
    url, singles = server
    names = [name for name in TASKS for _ in range(4)]
    images = torch.randn(len(names), 3, 64, 64, generator=torch.Generator().manual_seed(7))

    async def ask_all():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            requests = [client.post("/predict", json={"task": n, "pixels": x.tolist()}) for n, x in zip(names, images)]
            return await asyncio.gather(*requests)

    answers = asyncio.run(ask_all())
    for name, image, answer in zip(names, images, answers):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["task"] == name
        with torch.no_grad():
            expected = singles[name](image[None])[0]
        torch.testing.assert_close(torch.tensor(body["logits"]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"task": "dogs", "pixels": [[[0.0]]]}, 404, "unknown task 'dogs'; this server runs: pets, cars, birds"),
        ({"pixels": [[[0.0]]]}, 400, "'task' must be a task name"),
        ({"task": "pets"}, 400, "'pixels' is missing"),
        ({"task": "pets", "pixels": [[[0.0]]]}, 400, "must be numbers of shape [3, 64, 64]"),
        ({"task": "pets", "pixels": "abc", "x": 1}, 400, "unknown field(s) 'x'"),
        ([1, 2], 400, "a request is a JSON object"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(server, body, status, message):
    url, _ = server
    answer = httpx.post(f"{url}/predict", json=body, timeout=60)
    assert answer.status_code == status
    assert message in answer.json()["detail"]


def test_a_body_that_is_not_json_is_400(server):
    url, _ = server
    answer = httpx.post(f"{url}/predict", content=b"{not json", timeout=60)
    assert answer.status_code == 400 and "not JSON" in answer.json()["detail"]


def test_a_delta_of_another_base_is_refused_before_the_server_starts(tmp_path, capsys):
    _randomized_task("timm swin", "lora", 3, 0, tmp_path / "swin.safetensors")
    _randomized_task("timm vit", "lora", 3, 0, tmp_path / "vit.safetensors")
    tasks = {"vit": tmp_path / "vit.safetensors", "swin": tmp_path / "swin.safetensors"}
    assert main(_serve_command(tasks, _free_port())[3:]) == 1
    error = capsys.readouterr().err
    assert "task 'swin'" in error and "saved from another base architecture" in error


def _hf_vit_folder(folder: Path) -> Path:
    import transformers as T

    T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8).save_pretrained(folder)
    return folder


def test_a_base_of_any_zoo_serves_the_deltas_train_saves_from_it(tmp_path):
    import petl_surgery as ps
    from petl_surgery.serving import ZooBase, load_tasks

    spec = f"hf:{_hf_vit_folder(tmp_path / 'vit')}"
    singles = {}
    for seed, (name, method, classes) in enumerate([("pets", "patt", 3), ("cars", "lora", 4)]):
        single = ZooBase(spec, classes)()  # as `train hf:DIR` builds it (seed 0): the logits wrapper
        ps.apply(single, method)
        with torch.no_grad():
            for parameter in single.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        ps.save(single, tmp_path / f"{name}.safetensors")
        singles[name] = single.eval()
    served = load_tasks(ZooBase(spec, 3), {name: tmp_path / f"{name}.safetensors" for name in singles})
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tasks = ["cars", "pets", "pets", "cars"]
    with torch.no_grad():
        mixed = ps.forward_tasks(served, x, tasks)
        for row, name in enumerate(tasks):
            alone = singles[name](x[row:row + 1])[0]
            torch.testing.assert_close(mixed[row, : alone.shape[-1]], alone, rtol=1e-5, atol=1e-5)


def test_serve_refuses_a_delta_of_another_base_from_any_zoo(tmp_path, capsys):
    import petl_surgery as ps
    from petl_surgery.serving import ZooBase

    spec = f"hf:{_hf_vit_folder(tmp_path / 'vit')}"
    model = ZooBase(spec, 3)()
    ps.apply(model, "lora")
    ps.save(model, tmp_path / "fits.safetensors")
    _randomized_task("timm vit", "lora", 3, 0, tmp_path / "timm.safetensors")
    command = ["serve", spec, "--task", f"fits={tmp_path / 'fits.safetensors'}",
               "--task", f"timm={tmp_path / 'timm.safetensors'}", "--port", str(_free_port())]
    assert main(command) == 1
    error = capsys.readouterr().err
    assert "task 'timm'" in error and "another base" in error


def test_serve_refuses_a_video_model_by_name(tmp_path, capsys):
    import transformers as T

    folder = tmp_path / "videomae"
    T.VideoMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                     patch_size=8, num_frames=4, tubelet_size=2).save_pretrained(folder)
    _randomized_task("timm vit", "lora", 3, 0, tmp_path / "timm.safetensors")
    assert main(["serve", f"hf:{folder}", "--task", f"a={tmp_path / 'timm.safetensors'}"]) == 2
    assert "video model; serve takes one image per request" in capsys.readouterr().err
