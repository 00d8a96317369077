"""What a running server tells about itself: Prometheus metrics and OpenTelemetry traces.

Both are :class:`~callbrain.call.record.CallObserver` s: the calls record their
flight data once (:mod:`callbrain.call.record`) and these turn it into numbers
(:mod:`~callbrain.observe.metrics`, served by :mod:`~callbrain.observe.endpoint`)
and spans (:mod:`~callbrain.observe.tracing`, the ``otel`` extra).
:class:`~callbrain.observe.telemetry.Telemetry` builds what the agent file's
``server.metrics`` and ``server.tracing`` ask for (:mod:`~callbrain.observe.settings`).
"""
