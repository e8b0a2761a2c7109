"""Monitoring that acts: rules evaluated on live captions and answers, alerts delivered to signed
webhooks, the audio clip of each alert, and a searchable history (see ``docs/monitoring.md``)."""
