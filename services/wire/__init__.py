"""What crosses a process boundary, as typed records with one codec per wire.

- :mod:`services.wire.tokens`: audio-token publications (encoder -> Redis -> LM workers).
- :mod:`services.wire.events`: caption events (LM workers -> Redis -> gateways -> clients).
- :mod:`services.wire.settings`: session settings (protobuf, the page's JSON, the Redis hash).
"""
