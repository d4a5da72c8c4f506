"""A LitServe server for the named tasks of one base: each request names its task, and LitServe's dynamic
batching gathers requests of any tasks into one batch, run as one mixed-task forward
(:func:`petl_surgery.tasks.forward_tasks`).

LitServe starts one process per device and worker, each building its own copy of the base and loading
every task (``setup``); the base comes from ``build``, a picklable callable (a module-level function or a
``functools.partial`` of one), because the workers are spawned. Every task is loaded once in the calling
process first, so a delta that does not fit the base is refused before the server starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import SurgeryError
from ..loading import load
from ..tasks import forward_tasks, task_classes
from .requests import RequestCheck, check_request

try:
    import litserve as ls
except ImportError:  # the `serve` extra
    ls = None

API_PATH = "/predict"


def _litserve() -> Any:
    if ls is None:
        raise SurgeryError("serving needs LitServe: pip install 'petl_surgery[serve]'")
    return ls


def load_tasks(build: Callable[[], nn.Module], tasks: Mapping[str, Union[str, Path]]) -> nn.Module:
    """``build()`` with every task of ``tasks`` (name -> delta file) loaded under its name, in eval mode."""
    if not tasks:
        raise SurgeryError("a task server needs at least one task (name=delta file)")
    model = build()
    for name, path in tasks.items():
        try:
            load(model, path, name=name)
        except SurgeryError as error:
            raise SurgeryError(f"task {name!r}: {error}") from None
    return model.eval()


class _Base:
    """LitAPI methods (mixed into ``litserve.LitAPI`` by :func:`task_api`)."""

    def configure(self, build: Callable[[], nn.Module], tasks: Mapping[str, Union[str, Path]], shape: Sequence[int]) -> None:
        self.build = build
        self.tasks = {name: str(path) for name, path in tasks.items()}
        self.shape = tuple(int(s) for s in shape)

    def setup(self, device: str) -> None:
        torch.set_grad_enabled(False)
        self.device = torch.device(device)
        self.model = load_tasks(self.build, self.tasks).to(self.device)
        self.classes = task_classes(self.model)

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads a missing annotation as "the JSON body"
        task, pixels = check_request(request, list(self.tasks), self.shape)  # checked before; cheap again
        return task, torch.tensor(pixels, dtype=torch.float32)

    def batch(self, inputs: List[Tuple[str, torch.Tensor]]) -> Tuple[List[str], torch.Tensor]:
        return [task for task, _ in inputs], torch.stack([x for _, x in inputs])

    def predict(self, batched: Tuple[List[str], torch.Tensor]) -> List[Tuple[str, torch.Tensor]]:
        names, x = batched
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            output = forward_tasks(self.model, x.to(self.device, dtype), names)
        logits = getattr(output, "logits", output)
        return [(name, row) for name, row in zip(names, logits.float().cpu())]

    def unbatch(self, output: List[Tuple[str, torch.Tensor]]) -> List[Tuple[str, torch.Tensor]]:
        return output

    def encode_response(self, output):  # type: ignore[no-untyped-def]  # LitServe makes a response model of an annotation
        name, row = output
        width = self.classes.get(name)
        return {"task": name, "logits": (row if width is None else row[:width]).tolist()}


if ls is not None:

    class TaskAPI(_Base, ls.LitAPI):
        """The LitAPI of a task server (see :func:`task_api`)."""


def task_api(
    build: Callable[[], nn.Module],
    tasks: Mapping[str, Union[str, Path]],
    shape: Sequence[int],
    *,
    max_batch_size: int = 64,
    batch_timeout: float = 0.01,
) -> Any:
    """The ``litserve.LitAPI`` serving ``tasks`` on ``build()``'s base (``shape``: the input's
    ``(channels, height, width)``); LitServe batches up to ``max_batch_size`` requests, waiting at most
    ``batch_timeout`` seconds for a batch to fill."""
    _litserve()
    api = TaskAPI(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
    api.configure(build, tasks, shape)
    return api


@dataclass(frozen=True)
class ZooBase:
    """A picklable recipe of a base from any zoo the command line builds (what ``petl-surgery serve MODEL``
    builds): ``MODEL`` is ``timm:NAME`` (or a bare timm name), ``torchvision:NAME``, ``hf:DIR`` or
    ``open_clip:NAME`` (:func:`petl_surgery.training.zoo.parse_model_spec`), built by
    :func:`petl_surgery.training.zoo.build_model` after ``torch.manual_seed(seed)``, as ``train`` builds it:
    the same wrapper (a transformers model's logits, open_clip's image tower with a head), so the deltas
    ``train`` saved load into it. ``num_classes``: the width of the base's own head (default 1000), the
    one a task loaded without a head uses; every task with a head brings its own. ``pretrained``: the
    zoo's weights; ``weights``: a local weights file."""

    spec: str
    num_classes: int = 1000
    model_args: Tuple[Tuple[str, Any], ...] = ()
    seed: int = 0
    pretrained: bool = False
    weights: Optional[str] = None

    def __call__(self) -> nn.Module:
        from ..training.zoo import build_model, parse_model_spec

        torch.manual_seed(self.seed)
        return build_model(parse_model_spec(self.spec), self.num_classes, pretrained=self.pretrained,
                           weights=self.weights, model_args=dict(self.model_args))


def build_server(
    build: Callable[[], nn.Module],
    tasks: Mapping[str, Union[str, Path]],
    shape: Sequence[int],
    *,
    max_batch_size: int = 64,
    batch_timeout: float = 0.01,
    accelerator: str = "auto",
    devices: Union[int, str] = "auto",
    workers_per_device: int = 1,
    timeout: float = 30.0,
) -> Any:
    """A ``litserve.LitServer`` for ``tasks``, after loading each of them once here (a delta that does not
    fit the base raises SurgeryError now, not in a worker). ``/health`` answers 200 once the workers are
    ready; ``POST /predict`` takes ``{"task": NAME, "pixels": [[[...]]]}``."""
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise SurgeryError(f"shape must be the input's (channels, height, width); got {shape!r}")
    load_tasks(build, tasks)  # refuse what does not fit before any worker starts
    api = task_api(build, tasks, shape, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    check = (RequestCheck, {"path": API_PATH, "tasks": list(tasks), "shape": list(shape)})
    return _litserve().LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,
        middlewares=[check],
    )


def serve(
    build: Callable[[], nn.Module],
    tasks: Mapping[str, Union[str, Path]],
    shape: Sequence[int],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    **options: Any,
) -> None:
    """Serve ``tasks`` on ``host:port`` until interrupted (``options``: :func:`build_server`'s)."""
    server = build_server(build, tasks, shape, **options)
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False)
