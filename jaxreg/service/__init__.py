"""The reference training service: a small JAX transformer behind a Tinker-like HTTP API.

Install with ``pip install 'jaxreg[service]'``. Start it from Python::

  with jaxreg.service.start() as server:       # 127.0.0.1, a free port
      print(server.url)

or from a shell: ``jaxreg serve --host 127.0.0.1 --port 8000``. The API is described
in ``jaxreg.service.app``, the model in ``jaxreg.service.model``, the task corpus
in ``jaxreg.service.tasks``, the runtime in ``jaxreg.service.engine`` (ordering in
``jaxreg.service.ordering``, validation in ``jaxreg.service.validation``, the compiled
steps in ``jaxreg.service.steps``). With ``jaxreg[tinker]`` the same service also
speaks the official tinker SDK's protocol (``jaxreg.service.tinker_api`` and the
``tinker_*`` modules: LoRA in ``jaxreg.service.lora``, sampling in
``jaxreg.service.sampling``). ``jaxreg/service/README.md`` maps every module.
"""

from jaxreg.service.checkpoint import build_base_checkpoint as build_base_checkpoint
from jaxreg.service.checkpoint import load_base_checkpoint as load_base_checkpoint
from jaxreg.service.engine import BASE_MODEL as BASE_MODEL
from jaxreg.service.engine import Engine as Engine
from jaxreg.service.errors import ServiceError as ServiceError
from jaxreg.service.limits import Limits as Limits
from jaxreg.service.model import ModelConfig as ModelConfig
from jaxreg.service.server import Server as Server
from jaxreg.service.server import create_server as create_server
from jaxreg.service.server import start as start
