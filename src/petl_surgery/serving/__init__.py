"""Serving many tasks of one base over HTTP, on LitServe with dynamic batching (the ``serve`` extra)."""

from .requests import BadRequest, RequestCheck, check_request
from .server import ZooBase, build_server, load_tasks, serve, task_api

__all__ = ["BadRequest", "RequestCheck", "ZooBase", "build_server", "check_request", "load_tasks", "serve", "task_api"]
