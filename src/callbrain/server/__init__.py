"""The server: the ASGI app (:mod:`~callbrain.server.app`), what one agent's
calls share (:mod:`~callbrain.server.runtime`), the socket adapter
(:mod:`~callbrain.server.transport`), access control
(:mod:`~callbrain.server.access`), Retell's webhooks
(:mod:`~callbrain.server.webhooks`), the ``server:`` settings
(:mod:`~callbrain.server.settings`) and the process that runs it all
(:mod:`~callbrain.server.process`).

``create_app`` is importable from :mod:`callbrain` itself.
"""
