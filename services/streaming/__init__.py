"""Streaming audio encoding: chunked PCM -> log-mel windows -> Dasheng -> 5 Hz audio tokens.

See :mod:`services.streaming.encoder` and ``docs/streaming.md`` for the streaming rule and
when streaming output equals offline output.
"""
