"""Retell's Custom LLM protocol: the frames, the response-id rules, the call actions.

Pure: no I/O, no asyncio. See :mod:`callbrain.retell.frames`,
:mod:`callbrain.retell.ledger` and :mod:`callbrain.retell.actions`.
"""
